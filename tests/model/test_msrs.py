"""Guest RDMSR / WRMSR and KVM_GET/SET_MSRS on the model vCPU, against /dev/kvm where this host allows.

The guest (system_guest.py) reads and writes MSRs Linux 6.1 touches at boot, and some nobody
implements; its #GP handler counts each #GP, keeps the last error code and skips the 2-byte
RDMSR / WRMSR, so one run shows every outcome (KVM with ignore_msrs=0: kvm_emulate_rdmsr /
kvm_emulate_wrmsr inject #GP(0) for an unknown MSR or a refused value).
"""

from __future__ import annotations

import struct

import pytest

from pcihole.hv import exits
from pcihole.hv.model.cpu_msrs import (
    MSR_IA32_APICBASE,
    MSR_IA32_CR_PAT,
    MSR_IA32_TSC,
    MSR_LSTAR,
    MSR_MTRR_DEF_TYPE,
    MSR_MTRRCAP,
    MSR_STAR,
    PAT_RESET,
)
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.msr_intercept import msrpm_bit

from .system_guest import RESULTS, Handler, run_protected_guest, run_system_guest

UNKNOWN_MSR = 0x4B564DFF  # past kvmclock's range: no KVM (and no model) implements it
UNKNOWN_IN_MAP = 0x1FF0  # inside the SVM permission map's first range, implemented by no one
GP_COUNT, GP_ERROR = RESULTS + 0xF8, RESULTS + 0xF0

GP_SKIP = f"""
    incq {GP_COUNT}
    mov (%rsp), %rax
    mov %rax, {GP_ERROR}
    addq $2, 8(%rsp)
    add $8, %rsp
    iretq
"""


def rdmsr(index: int, slot: int) -> str:
    """RDMSR with RAX / RDX all ones first (RDMSR clears their upper halves), both kept."""
    return f"""
    mov ${index:#x}, %ecx
    mov $-1, %rax
    mov $-1, %rdx
    rdmsr
    mov %rax, {RESULTS + 16 * slot}
    mov %rdx, {RESULTS + 16 * slot + 8}
    """


def wrmsr(index: int, value: int) -> str:
    return f"""
    mov ${index:#x}, %ecx
    mov ${value & 0xFFFFFFFF:#x}, %eax
    mov ${value >> 32:#x}, %edx
    wrmsr
    """


BODY = "\n".join(
    [
        rdmsr(MSR_IA32_APICBASE, 0),
        rdmsr(MSR_IA32_CR_PAT, 1),
        rdmsr(MSR_MTRRCAP, 2),
        wrmsr(MSR_LSTAR, 0xFFFFFFFF81234560),
        rdmsr(MSR_LSTAR, 3),
        wrmsr(MSR_IA32_CR_PAT, 0x0007010600070106),
        rdmsr(MSR_IA32_CR_PAT, 4),
        rdmsr(UNKNOWN_MSR, 5),  # #GP 1
        wrmsr(UNKNOWN_MSR, 1),  # #GP 2
        rdmsr(UNKNOWN_IN_MAP, 6),  # #GP 3
        wrmsr(MSR_MTRRCAP, 0),  # #GP 4: read-only
        rdmsr(MSR_IA32_TSC, 7),
        rdmsr(MSR_IA32_TSC, 8),
    ]
)
# kvm_pat_valid refuses memory type 2 (#GP) in upstream KVM; this host's PVM module accepts it, so
# this step is checked on the model only (against kvm_set_msr_common, not against this host).
BAD_PAT = wrmsr(MSR_IA32_CR_PAT, 0x0202020202020202)


def supported_cpuid_of(hv):
    """A setup(vcpu) giving the guest KVM_GET_SUPPORTED_CPUID (what a VMM gives it)."""
    return lambda vcpu: vcpu.set_cpuid2(hv.get_supported_cpuid())


def run(hv, extra: str = ""):
    return run_system_guest(hv, BODY + extra, [Handler(13, GP_SKIP)])


def split(run_) -> list[int]:
    return list(struct.unpack("<32Q", run_.results))


def test_guest_msrs_sdm(model_hv):
    r = run(model_hv, BAD_PAT)
    q = split(r)
    assert r.exits == [exits.Hlt()]
    assert (q[0], q[1]) == (0xFEE00900, 0)  # BSP, enabled, at the default base; RDX cleared
    assert (q[2], q[3]) == (PAT_RESET & 0xFFFFFFFF, PAT_RESET >> 32)
    assert (q[4], q[5]) == (0x508, 0)  # kvm_mtrr_get_msr: 8 variable ranges, fixed, WC
    assert (q[6], q[7]) == (0x81234560, 0xFFFFFFFF)
    assert (q[8], q[9]) == (0x00070106, 0x00070106)
    # The #GP'd RDMSRs wrote nothing to RDX (the handler itself used RAX for the error code).
    assert (q[10], q[11]) == (0, 0xFFFFFFFFFFFFFFFF)
    assert (q[12], q[13]) == (0, 0xFFFFFFFFFFFFFFFF)
    tsc1, tsc2 = q[14] | q[15] << 32, q[16] | q[17] << 32
    assert 0 < tsc1 < tsc2
    assert q[GP_COUNT - RESULTS >> 3] == 5 and q[GP_ERROR - RESULTS >> 3] == 0


@pytest.mark.kvm
def test_guest_msrs_match_kvm(kvm_hv, model_hv):
    kvm, model = run(kvm_hv), run(model_hv)
    if kvm.exits[-1] != exits.Hlt():
        pytest.skip(f"this host's KVM (PVM) does not run the MSR guest to its HLT: {kvm.exits[-1]}")
    qk, qm = split(kvm), split(model)
    # The TSC values differ by nature (slots 7, 8): compared by order in the SDM test.
    same = [i for i in range(32) if i not in range(14, 18)]
    assert [qm[i] for i in same] == [qk[i] for i in same]
    assert model.exits == kvm.exits


def test_kvm_get_set_msrs_convention(model_hv):
    vm = model_hv.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        vcpu.set_msrs({MSR_STAR: 0x0023001000080000, MSR_MTRR_DEF_TYPE: 0xC06})
        got = vcpu.get_msrs([MSR_STAR, MSR_MTRR_DEF_TYPE, UNKNOWN_MSR, MSR_IA32_CR_PAT])
        # msr_io stops at the first MSR it cannot read: the ones after it are not returned.
        assert got == {MSR_STAR: 0x0023001000080000, MSR_MTRR_DEF_TYPE: 0xC06}
        with pytest.raises(ModelKvmError) as e:
            vcpu.set_msrs({MSR_LSTAR: 0x1000, UNKNOWN_MSR: 1, MSR_CSTAR_: 2})
        assert "0x4b564dff" in str(e.value) and e.value.errno == 22
        assert vcpu.get_msrs([MSR_LSTAR, MSR_CSTAR_]) == {MSR_LSTAR: 0x1000, MSR_CSTAR_: 0}
        vcpu.set_msrs({MSR_IA32_TSC: 10**15})
        assert vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC] >= 10**15
    finally:
        vm.close()


MSR_CSTAR_ = 0xC0000083


@pytest.mark.kvm
def test_kvm_get_set_msrs_convention_matches_kvm(kvm_vm):
    """The same calls on /dev/kvm: the first refused MSR ends KVM_SET_MSRS and KVM_GET_MSRS."""
    vcpu = kvm_vm.create_vcpu(0)
    vcpu.set_msrs({MSR_STAR: 0x0023001000080000, MSR_MTRR_DEF_TYPE: 0xC06})
    got = vcpu.get_msrs([MSR_STAR, MSR_MTRR_DEF_TYPE, UNKNOWN_MSR, MSR_IA32_CR_PAT])
    assert got == {MSR_STAR: 0x0023001000080000, MSR_MTRR_DEF_TYPE: 0xC06}
    with pytest.raises(OSError) as e:
        vcpu.set_msrs({MSR_LSTAR: 0x1000, UNKNOWN_MSR: 1, MSR_CSTAR_: 2})
    assert e.value.errno == 22
    assert vcpu.get_msrs([MSR_LSTAR, MSR_CSTAR_]) == {MSR_LSTAR: 0x1000, MSR_CSTAR_: 0}


def test_values_set_before_the_first_run_reach_the_engine(model_hv):
    """KVM_SET_MSRS before KVM_SET_SREGS (configure_vcpu's order): the engine built at the first
    run holds them, and the guest reads them (LSTAR natively, with no intercept; PAT through it)."""
    assert msrpm_bit(MSR_LSTAR, write=False) is not None  # in the map: its bit decides

    def setup(vcpu):
        vcpu.set_msrs({MSR_LSTAR: 0xFFFFFFFF81000000, MSR_IA32_CR_PAT: 0x0007040600070106})

    r = run_system_guest(
        model_hv, rdmsr(MSR_LSTAR, 0) + rdmsr(MSR_IA32_CR_PAT, 1), [Handler(13, GP_SKIP)], setup=setup
    )
    q = split(r)
    assert (q[0], q[1]) == (0x81000000, 0xFFFFFFFF)
    assert (q[2], q[3]) == (0x00070106, 0x00070406)


GP_SKIP_32 = f"""
    incl {GP_COUNT}
    pop %eax
    mov %eax, {GP_ERROR}
    addl $2, (%esp)
    iret
"""


@pytest.mark.kvm
def test_protected_mode_msrs_match_kvm(kvm_hv, model_hv):
    """The PVH entry state (32-bit, paging off) reads and writes MSRs too (Linux's startup_32 sets
    EFER.LME): through the same intercept in a 32-bit engine."""
    body = f"""
    mov ${MSR_IA32_APICBASE}, %ecx
    rdmsr
    mov %eax, {RESULTS}
    mov %edx, {RESULTS + 4}
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    rdmsr
    mov %eax, {RESULTS + 8}
    mov ${UNKNOWN_MSR:#x}, %ecx
    rdmsr
    """
    # KVM lets the guest set EFER.LME only where its CPUID has long mode (__kvm_valid_efer).
    model = run_protected_guest(model_hv, body, [Handler(13, GP_SKIP_32)], setup=supported_cpuid_of(model_hv))
    q = split(model)
    assert model.exits == [exits.Hlt()]
    assert q[0] == 0xFEE00900 and q[1] & 0x100  # APIC_BASE; EFER.LME set
    assert q[GP_COUNT - RESULTS >> 3] == 1
    kvm = run_protected_guest(kvm_hv, body, [Handler(13, GP_SKIP_32)], setup=supported_cpuid_of(kvm_hv))
    if kvm.exits[-1] != exits.Hlt():
        pytest.skip(f"this host's KVM (PVM) does not run the 32-bit MSR guest to its HLT: {kvm.exits[-1]}")
    assert split(kvm) == q


def test_msr_after_int_n_returns_to_the_next_instruction(model_hv):
    """An INT n leaves exception_is_int set in the engine, which would move EIP of the next
    intercepted RDMSR to the INT's return address: the delivery clears it (engine_state.py)."""
    body = "int $0x40\n" + rdmsr(MSR_IA32_APICBASE, 0) + f"movq $7, {RESULTS + 0x20}\n"
    r = run_system_guest(model_hv, body, [Handler(0x40, "iretq"), Handler(13, GP_SKIP)])
    q = split(r)
    assert r.exits == [exits.Hlt()]
    assert (q[0], q[4]) == (0xFEE00900, 7)


def test_set_sregs_keeps_the_engine_msrs(model_hv):
    """KVM_SET_SREGS in an exit loads the engine's special registers, and nothing else: the MSRs
    the engine holds stay."""

    def setup(vcpu):
        vcpu.set_msrs({MSR_STAR: 0x0023001000080000})

    def on_exit(vcpu, exit_, i):
        if i == 0:
            sregs = vcpu.get_sregs()
            sregs.fs.base = 0x1000  # something to load
            vcpu.set_sregs(sregs)
            return True
        return False

    body = rdmsr(MSR_STAR, 0) + "hlt\n" + rdmsr(MSR_STAR, 1)
    r = run_system_guest(model_hv, body, [], setup=setup, on_exit=on_exit)
    q = split(r)
    assert (q[0], q[2]) == (0x00080000, 0x00080000) and q[1] == q[3] == 0x00230010


LONG_MODE_FROM_32 = """
    movl $0x61003, 0x60000         # PML4[0] -> PDPT
    movl $0x62003, 0x61000         # PDPT[0] -> PD
    movl $0x83, 0x62000            # PD[0]: 2 MiB at 0
    mov $0x60000, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                 # PAE
    mov %eax, %cr4
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax                # EFER.LME
    wrmsr
    movl $0x0000ffff, 0x8030       # GDT[6]: 64-bit kernel code (L = 1)
    movl $0x00af9a00, 0x8034
    movw $0x37, 0x7f00
    movl $0x8000, 0x7f02
    lgdt 0x7f00
    mov %cr0, %eax
    or $0x80000000, %eax           # PG: long mode is active
    mov %eax, %cr0
    ljmp $0x30, $long64
.code64
long64:
"""


def test_results_in_long_mode_reached_from_a_32_bit_engine(model_hv):
    """Linux enters through the 32-bit PVH entry and switches to long mode itself, in the engine
    built for the entry state. RDMSR, RDTSC and CPUID results there still clear the upper halves
    of their 64-bit registers (through the engine's state: that engine's uc_reg_write reaches
    only the low halves)."""
    from pcihole.hv.model.cpuid import supported_cpuid

    body = LONG_MODE_FROM_32 + "\n".join(
        [
            rdmsr(MSR_IA32_APICBASE, 0),
            read_tsc_64(1),
            f"mov $-1, %rbx\n xor %eax, %eax\n cpuid\n mov %rbx, {RESULTS + 0x20}\n mov %rcx, {RESULTS + 0x28}",
        ]
    )
    run = run_protected_guest(model_hv, body, [], setup=lambda vcpu: vcpu.set_cpuid2(supported_cpuid()))
    assert run.exits == [exits.Hlt()]
    q = split(run)
    assert (q[0], q[1]) == (0xFEE00900, 0)
    assert q[2] >> 32 == 0 and q[3] >> 32 == 0 and q[2] | q[3] << 32 > 0
    assert struct.pack("<QQ", q[4], q[5]) == b"Genu\0\0\0\0ntel\0\0\0\0"  # EBX, ECX of "GenuineIntel"


def read_tsc_64(slot: int) -> str:
    return f"""
    mov $-1, %rax
    mov $-1, %rdx
    rdtsc
    mov %rax, {RESULTS + 16 * slot}
    mov %rdx, {RESULTS + 16 * slot + 8}
    """


RESET_MSRS = [0x1B, 0xFE, 0x1D9, 0x174, 0x175, 0x176, 0x277, 0x2FF, 0x200, 0x201, 0x250, 0x268, 0xC0000080,
              0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102,
              0xC0000103, 0x4B564D00, 0x4B564D01, 0x11, 0x12]  # fmt: skip


def reset_values(hv, indices) -> dict[int, int | None]:
    vm = hv.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        return {i: vcpu.get_msrs([i]).get(i) for i in indices}
    finally:
        vm.close()


@pytest.mark.kvm
def test_reset_values_match_kvm(kvm_hv, model_hv):
    """KVM_GET_MSRS on a fresh vCPU (kvm_vcpu_reset), MSR by MSR."""
    assert reset_values(model_hv, RESET_MSRS) == reset_values(kvm_hv, RESET_MSRS)


def test_reset_values_kvm_vmx_gives(model_hv):
    """Two reset values this host's KVM (PVM) does not give as upstream KVM's VMX code does, checked
    against the kernel source: IA32_MISC_ENABLE = PEBS_UNAVAIL | BTS_UNAVAIL (kvm_vcpu_reset;
    PVM gives fast strings only) and IA32_UCODE_REV = 0x100000000 (vmx_vcpu_create; PVM gives 0)."""
    assert reset_values(model_hv, [0x1A0, 0x8B]) == {0x1A0: 0x1800, 0x8B: 0x100000000}


def test_a_device_registered_on_a_running_vcpu_sees_the_guest_accesses(model_hv):
    """A device (here a stand-in for the local APIC's x2APIC range and TSC-deadline MSR) registers
    its MSRs between two runs, after the engine exists: the guest's next RDMSR / WRMSR reach it."""
    seen: list[tuple[int, int]] = []

    def on_exit(vcpu, exit_, i):
        if i == 0:
            vcpu.msrs.register(
                0x800, 0x8FF, read=lambda idx, host: idx << 4, write=lambda *a: None, owner="x2apic"
            )
            vcpu.msrs.register(
                0x6E0,
                read=lambda idx, host: 0,
                write=lambda idx, v, host: seen.append((idx, v)),
                owner="lapic",
            )
            return True
        return False

    body = rdmsr(0x802, 0) + "hlt\n" + rdmsr(0x802, 1) + wrmsr(0x6E0, 0x123456789)
    r = run_system_guest(model_hv, body, [Handler(13, GP_SKIP)], on_exit=on_exit)
    q = split(r)
    assert q[GP_COUNT - RESULTS >> 3] == 1  # the first RDMSR, before anyone owned 0x802
    assert (q[2], q[3]) == (0x8020, 0)
    assert seen == [(0x6E0, 0x123456789)]


# --- KVM's checks of the engine MSRs' values (set_efer, kvm_mtrr_valid) -------------------------------

MSR_EFER_ = 0xC0000080
MSR_MTRR_PHYS_BASE0_ = 0x200
MSR_MTRR_PHYS_MASK0_ = 0x201
MSR_MTRR_FIX64K_ = 0x250
#: (MSR, value, refused): kvm_mtrr_valid's rules, each on both sides of the line.
MTRR_WRITES = [
    (MSR_MTRR_DEF_TYPE, 0xC06, False),  # enabled, fixed enabled, WB
    (MSR_MTRR_DEF_TYPE, 0x1C06, True),  # bit 12: outside 0xcff
    (MSR_MTRR_DEF_TYPE, 0xC02, True),  # type 2 is reserved
    (MSR_MTRR_FIX64K_, 0x0606060606060606, False),
    (MSR_MTRR_FIX64K_, 0x0606060606070606, True),  # type 7 (UC-) only PAT has
    (MSR_MTRR_PHYS_BASE0_, 0x80000006, False),  # 2 GiB, WB
    (MSR_MTRR_PHYS_BASE0_, 0x80000106, True),  # bits 11:8 are reserved
    (MSR_MTRR_PHYS_BASE0_, 1 << 52 | 6, True),  # above any MAXPHYADDR
    (MSR_MTRR_PHYS_MASK0_, 0xFC0000800, False),  # valid, 1 GiB (within 36 bits)
    (MSR_MTRR_PHYS_MASK0_, 0xFC0000801, True),  # bits 10:0 reserved
]


def checked_wrmsr(index: int, value: int, slot: int) -> str:
    """WRMSR, then the #GP count so far into RESULTS slot `slot` (8 bytes each)."""
    return wrmsr(index, value) + f"mov {GP_COUNT}, %rax\n mov %rax, {RESULTS + 8 * slot}\n"


def refusals(run_, n: int) -> list[bool]:
    """Which of the first n checked_wrmsr steps took a #GP."""
    q = [struct.unpack_from("<Q", run_.results, 8 * i)[0] for i in range(n)]
    return [q[i] > (q[i - 1] if i else 0) for i in range(n)]


def mtrr_body() -> str:
    return "".join(checked_wrmsr(index, value, i) for i, (index, value, _) in enumerate(MTRR_WRITES))


def test_guest_mtrr_writes_are_checked(model_hv):
    r = run_system_guest(model_hv, mtrr_body(), [Handler(13, GP_SKIP)], setup=supported_cpuid_of(model_hv))
    assert r.exits == [exits.Hlt()]
    assert refusals(r, len(MTRR_WRITES)) == [refused for _, _, refused in MTRR_WRITES]


@pytest.mark.kvm
def test_guest_mtrr_writes_match_kvm(kvm_hv, model_hv):
    kvm = run_system_guest(kvm_hv, mtrr_body(), [Handler(13, GP_SKIP)], setup=supported_cpuid_of(kvm_hv))
    if kvm.exits[-1] != exits.Hlt():
        pytest.skip(f"this host's KVM (PVM) does not run the MTRR guest to its HLT: {kvm.exits[-1]}")
    model = run_system_guest(
        model_hv, mtrr_body(), [Handler(13, GP_SKIP)], setup=supported_cpuid_of(model_hv)
    )
    assert refusals(model, len(MTRR_WRITES)) == refusals(kvm, len(MTRR_WRITES))


def test_guest_efer_writes_are_checked(model_hv):
    """set_efer for a guest in long mode: a reserved bit (#GP), LME cleared with paging on (#GP),
    NX only where CPUID has it, and LMA kept whatever the value says. (This host's KVM (PVM)
    shuts the guest down on a kernel-mode WRMSR of EFER: model only.)"""
    efer = 0x500  # LME | LMA: what enter_long_mode sets
    steps = [
        (efer | 1 << 9, True),  # bit 9: reserved
        (efer & ~0x100, True),  # LME cleared with paging on
        (efer | 0x800 | 1, False),  # NX and SCE: in the supported CPUID
        (0x100 | 0x800 | 1, False),  # LMA clear in the value: kept set
    ]
    body = "".join(checked_wrmsr(MSR_EFER_, v, i) for i, (v, _) in enumerate(steps)) + rdmsr(MSR_EFER_, 4)
    r = run_system_guest(model_hv, body, [Handler(13, GP_SKIP)], setup=supported_cpuid_of(model_hv))
    assert r.exits == [exits.Hlt()]
    assert refusals(r, len(steps)) == [refused for _, refused in steps]
    assert struct.unpack_from("<Q", r.results, 64)[0] == 0xD01  # SCE | LME | LMA | NX

    # Without KVM_SET_CPUID2 the guest has no NX (__kvm_valid_efer): #GP.
    body = checked_wrmsr(MSR_EFER_, efer | 0x800, 0)
    r = run_system_guest(model_hv, body, [Handler(13, GP_SKIP)])
    assert r.exits == [exits.Hlt()] and refusals(r, 1) == [True]


def _host_refusals(hv) -> list[bool]:
    """KVM_SET_MSRS of each value on a fresh vCPU (no CPUID: host writes skip __kvm_valid_efer)."""
    out = []
    vm = hv.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        # without CPUID 0x80000008, cpuid_query_maxphyaddr says 36: bit 36 of a mask is reserved
        extra = [(MSR_MTRR_PHYS_MASK0_, 1 << 36 | 0x800), (MSR_EFER_, 1 << 9), (MSR_EFER_, 0xD01)]
        for index, value in [(i, v) for i, v, _ in MTRR_WRITES] + extra:
            try:
                vcpu.set_msrs({index: value})
                out.append(False)
            except OSError as e:
                assert e.errno == 22
                out.append(True)
        out.append(vcpu.get_msrs([MSR_EFER_])[MSR_EFER_] == 0x901)  # LMA: the CPU's, not the VMM's
    finally:
        vm.close()
    return out


def test_host_writes_are_checked(model_hv):
    assert _host_refusals(model_hv) == [refused for _, _, refused in MTRR_WRITES] + [True, True, False, True]


@pytest.mark.kvm
def test_host_writes_match_kvm(kvm_hv, model_hv):
    assert _host_refusals(model_hv) == _host_refusals(kvm_hv)
