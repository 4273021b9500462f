"""The MSRs a model vCPU owns itself (kvm_get_msr_common / kvm_set_msr_common and mtrr.c, for
what Linux 6.1 touches at boot), registered in its MsrTable (msr.py).

Two kinds:
- engine MSRs: Unicorn's helper_rdmsr / helper_wrmsr keep them in CPUX86State as KVM keeps them
  in the VMCS / vcpu->arch, and do guest accesses with no Python call (msr_intercept.py leaves
  their bits clear). KVM_GET/SET_MSRS reach them through uc.msr_read / uc.msr_write, or, while
  the vCPU has no engine (before its first run, between set_sregs and the next run), through the
  values the vCPU keeps for the next engine (`EngineMsrs`).
- Python MSRs: IA32_TSC (tsc.py), TSC_AUX (read by the RDTSCP hook at every RDTSCP, which Linux
  6.1's rdtsc_ordered() uses where RDTSCP is offered; written once per CPU at boot),
  IA32_APIC_BASE until a local APIC takes it over, the microcode revision, and the checks KVM
  makes that the engine does not (PAT values, MTRRcap read-only).
- engine MSRs KVM checks on a write (EFER: set_efer; the MTRRs: kvm_mtrr_valid): the engine
  reads them natively, but each write, the guest's and the VMM's, passes KVM's check in Python
  first (a guest WRMSR is intercepted for it), since helper_wrmsr takes any value.

What is not here is unknown: #GP(0) on a guest access (KVM with ignore_msrs=0), and the end of
KVM_GET/SET_MSRS. kvmclock's MSRs are kvmclock.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from pcihole.hv.model.msr import MsrFault, MsrTable, MsrValue
from pcihole.hv.msr_index import (
    MSR_CSTAR,
    MSR_EFER,
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_IA32_APICBASE,
    MSR_IA32_APICBASE_BSP,
    MSR_IA32_APICBASE_ENABLE,
    MSR_IA32_CR_PAT,
    MSR_IA32_DEBUGCTLMSR,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_TSC,
    MSR_IA32_UCODE_REV,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_MTRR_DEF_TYPE,
    MSR_MTRR_FIX4K_C0000,
    MSR_MTRR_FIX16K_80000,
    MSR_MTRR_FIX16K_A0000,
    MSR_MTRR_FIX64K_00000,
    MSR_MTRR_PHYS_BASE0,
    MSR_MTRRCAP,
    MSR_STAR,
    MSR_SYSCALL_MASK,
    MSR_TSC_AUX,
)
from pcihole.hv.uapi import kvm_sregs
from pcihole.hv.x86_cpu_state import EFER_LMA, EFER_LME, X86_CR0_PG

if TYPE_CHECKING:
    from unicorn import Uc

    from pcihole.hv.model.cpuid import CpuidTable
    from pcihole.hv.model.tsc import TscClock


#: kvm_vcpu_reset: MSR_IA32_APICBASE = APIC_DEFAULT_PHYS_BASE | enable, plus BSP for vCPU 0.
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
#: KVM's vcpu->arch.microcode_version at creation (kvm_arch_vcpu_create: 0x100000000).
UCODE_REV_RESET = 0x100000000
#: kvm_vcpu_reset / the SDM's power-on PAT (WB, WT, UC-, UC, twice).
PAT_RESET = 0x0007040600070406
#: kvm_vcpu_reset: IA32_MISC_ENABLE = PEBS_UNAVAIL | BTS_UNAVAIL (the engine's own reset value is
#: QEMU's, fast strings only).
MSR_IA32_MISC_ENABLE_BTS_UNAVAIL = 1 << 11
MSR_IA32_MISC_ENABLE_PEBS_UNAVAIL = 1 << 12
MISC_ENABLE_RESET = MSR_IA32_MISC_ENABLE_PEBS_UNAVAIL | MSR_IA32_MISC_ENABLE_BTS_UNAVAIL
#: The PAT entry types a write may hold (kvm_pat_valid: 0, 1, 4, 5, 6, 7; 2 and 3 reserved).
_PAT_VALID_TYPES = frozenset({0, 1, 4, 5, 6, 7})

_MTRR_VAR = tuple(range(MSR_MTRR_PHYS_BASE0, MSR_MTRR_PHYS_BASE0 + 16))
_MTRR_FIXED = (
    MSR_MTRR_FIX64K_00000,
    MSR_MTRR_FIX16K_80000,
    MSR_MTRR_FIX16K_A0000,
    *range(MSR_MTRR_FIX4K_C0000, MSR_MTRR_FIX4K_C0000 + 8),
)
#: MSRs Unicorn's helpers read and write as KVM does, in both directions, with no Python call.
#: EFER is among them but is also in kvm_sregs: EngineMsrs treats it apart.
ENGINE_MSRS: tuple[int, ...] = (
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_MISC_ENABLE,
    *_MTRR_VAR,
    *_MTRR_FIXED,
    MSR_MTRR_DEF_TYPE,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SYSCALL_MASK,
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_KERNEL_GS_BASE,
)
# The hidden bases of FS and GS (kvm_sregs' fs.base / gs.base) as MSRs.
_SEGMENT_BASES = frozenset((MSR_FS_BASE, MSR_GS_BASE))
#: Read by the engine, written through Python (KVM checks the value; the engine does not).
ENGINE_READ_ONLY_NATIVE: tuple[int, ...] = (MSR_IA32_CR_PAT, MSR_MTRRCAP, MSR_EFER)
#: The engine MSRs whose writes KVM checks (set_efer, kvm_mtrr_valid): reads pass through, writes not.
_CHECKED_WRITES = frozenset((MSR_EFER, *_MTRR_VAR, *_MTRR_FIXED, MSR_MTRR_DEF_TYPE))

EFER_SCE = 1 << 0
EFER_NX = 1 << 11
#: efer_reserved_bits as kvm_x86_vendor_init leaves them on an Intel host with NX and no nested
#: SVM: ~(SCE | LME | LMA), then kvm_enable_efer_bits(EFER_NX). Set: #GP, and KVM_SET_MSRS fails.
EFER_RESERVED_BITS = ((1 << 64) - 1) & ~(EFER_SCE | EFER_LME | EFER_LMA | EFER_NX)
CPUID_80000001_EDX_NX = 1 << 20
CPUID_80000001_EDX_LM = 1 << 29
#: cpuid_query_maxphyaddr without a CPUID 0x80000008 entry.
DEFAULT_MAXPHYADDR = 36


def _valid_mtrr_type(t: int) -> bool:
    """valid_mtrr_type: UC, WC, WT, WP, WB (0, 1, 4, 5, 6)."""
    return t < 8 and bool((1 << t) & 0x73)


def guest_maxphyaddr(cpuid: CpuidTable) -> int:
    """cpuid_query_maxphyaddr: CPUID 0x80000008 EAX[7:0] where 0x80000000 reaches it, else 36."""
    top = cpuid.find(0x80000000, None)
    if top is None or top.eax < 0x80000008:
        return DEFAULT_MAXPHYADDR
    entry = cpuid.find(0x80000008, None)
    return entry.eax & 0xFF if entry is not None else DEFAULT_MAXPHYADDR


def mtrr_valid(index: int, value: int, maxphyaddr: int) -> bool:
    """kvm_mtrr_valid (mtrr.c), for the guest's and the host's writes alike."""
    if index == MSR_MTRR_DEF_TYPE:
        return not value & ~0xCFF and _valid_mtrr_type(value & 0xFF)
    if index in _MTRR_FIXED:
        return all(_valid_mtrr_type((value >> (8 * i)) & 0xFF) for i in range(8))
    mask = ((1 << 64) - 1) & ~((1 << maxphyaddr) - 1)  # kvm_vcpu_reserved_gpa_bits_raw
    if index & 1 == 0:  # MTRRphysBase
        if not _valid_mtrr_type(value & 0xFF):
            return False
        mask |= 0xF00
    else:  # MTRRphysMask
        mask |= 0x7FF
    return not value & mask


#: KVM_GET_MSRS of MTRRcap (kvm_mtrr_get_msr: 0x500 | KVM_NR_VAR_MTRR = WC, fixed, 8 variable), also
#: what the engine's helper_rdmsr answers where its CPU model has CPUID.MTRR.
MTRRCAP_VALUE = 0x508


class EngineMsrs:
    """The engine MSRs of one vCPU: in its live engine, else kept here for the next one."""

    def __init__(
        self,
        engine: Callable[[], Uc | None],
        native: Callable[[], AbstractContextManager[None]],
        sregs: Callable[[], kvm_sregs],
    ) -> None:
        self._engine = engine  # the live engine, or None
        self._native = native  # MsrIntercept.native of the vCPU
        self._sregs = sregs  # the vCPU's kvm_sregs, whose efer is EFER while there is no engine
        self.tsc_aux: MsrValue | None = None  # IA32_TSC_AUX, a Python MSR (register_vcpu_msrs)
        self.saved: dict[int, int] = {MSR_IA32_CR_PAT: PAT_RESET, MSR_IA32_MISC_ENABLE: MISC_ENABLE_RESET}

    def read(self, index: int, host: bool) -> int:
        if index == MSR_MTRRCAP:
            return MTRRCAP_VALUE
        uc = self._engine()
        if uc is None:
            return self._sregs().efer if index == MSR_EFER else self.saved.get(index, 0)
        with self._native():
            return uc.msr_read(index)

    def write(self, index: int, value: int, host: bool) -> None:
        uc = self._engine()
        if uc is None:
            if index == MSR_EFER:
                # kvm_set_msr_common -> set_efer for a host write: LMA is kept as it is.
                sregs = self._sregs()
                sregs.efer = (value & ~EFER_LMA) | (sregs.efer & EFER_LMA)
            else:
                self.saved[index] = value
            return
        with self._native():
            uc.msr_write(index, value)

    def sregs_set(self) -> None:
        """KVM_SET_SREGS: FS / GS base are its fs.base and gs.base from now on, not a value a
        KVM_SET_MSRS gave before it (the same register: the later write wins)."""
        for index in _SEGMENT_BASES:
            self.saved.pop(index, None)

    def restore(self, uc: Uc) -> None:
        """Load the kept MSRs into the first engine (EFER came with kvm_sregs); later engines get
        them with the whole CPU state (cpu.carry_state)."""
        with self._native():
            for index, value in self.saved.items():
                uc.msr_write(index, value)

    def pass_through(self) -> Iterator[tuple[int, bool]]:
        """The (index, write) accesses the engine does itself (msr_intercept.MsrIntercept)."""
        for index in ENGINE_MSRS:
            yield index, False
            if index not in _CHECKED_WRITES:
                yield index, True
        for index in ENGINE_READ_ONLY_NATIVE:
            yield index, False


def register_vcpu_msrs(
    table: MsrTable,
    engine: EngineMsrs,
    tsc: TscClock,
    vcpu_id: int,
    on_tsc_write: Callable[[], None] = lambda: None,
    *,
    cpuid: Callable[[], CpuidTable],
    cr0: Callable[[], int],
) -> None:
    """The vCPU's own MSRs, as a freshly created KVM vCPU has them (kvm_vcpu_reset).
    `on_tsc_write` runs after every write of IA32_TSC (KVM_REQ_CLOCK_UPDATE: kvmclock republishes);
    `cpuid` is the guest's CPUID table (KVM_SET_CPUID2's), `cr0` the guest's CR0 now."""
    owner = "vcpu"
    for index in ENGINE_MSRS:
        if index not in _CHECKED_WRITES:
            table.register(index, read=engine.read, write=engine.write, owner=owner, engine=True)

    def guest_has(edx_bit: int) -> bool:
        """guest_cpuid_has for a CPUID 0x80000001 EDX feature (the exact entry, no range rule)."""
        entry = cpuid().find(0x80000001, None)
        return entry is not None and bool(entry.edx & edx_bit)

    def write_efer(index: int, value: int, host: bool) -> None:
        # set_efer: reserved bits refused for everyone; a guest also needs the CPUID features
        # of the bits it sets (__kvm_valid_efer) and may not toggle LME with paging on. LMA is
        # the CPU's: kept as it is, whatever the value says.
        if value & EFER_RESERVED_BITS:
            raise MsrFault(f"EFER {value:#x}: reserved bits (efer_reserved_bits)")
        old = engine.read(index, host)
        if not host:
            if value & (EFER_LME | EFER_LMA) and not guest_has(CPUID_80000001_EDX_LM):
                raise MsrFault(f"EFER {value:#x}: LME / LMA without CPUID long mode")
            if value & EFER_NX and not guest_has(CPUID_80000001_EDX_NX):
                raise MsrFault(f"EFER {value:#x}: NX without CPUID NX")
            if cr0() & X86_CR0_PG and (old ^ value) & EFER_LME:
                raise MsrFault(f"EFER {value:#x}: LME changed with paging on")
        engine.write(index, value & ~EFER_LMA | old & EFER_LMA, host)

    table.register(MSR_EFER, read=engine.read, write=write_efer, owner=owner, engine=True)

    def write_mtrr(index: int, value: int, host: bool) -> None:
        # kvm_mtrr_set_msr: kvm_mtrr_valid, for the guest's and the host's writes alike.
        if not mtrr_valid(index, value, guest_maxphyaddr(cpuid())):
            raise MsrFault(f"MTRR {index:#x} {value:#x}: a reserved bit or memory type (kvm_mtrr_valid)")
        engine.write(index, value, host)

    for index in _CHECKED_WRITES - {MSR_EFER}:
        table.register(index, read=engine.read, write=write_mtrr, owner=owner, engine=True)

    def write_pat(index: int, value: int, host: bool) -> None:
        # kvm_pat_valid: every byte a valid memory type, else #GP (host writes too: kvm_set_msr_common).
        if any((value >> (8 * i)) & 0xFF not in _PAT_VALID_TYPES for i in range(8)):
            raise MsrFault(f"PAT {value:#x}: a reserved memory type")
        engine.write(index, value, host)

    table.register(MSR_IA32_CR_PAT, read=engine.read, write=write_pat, owner=owner)

    def write_mtrrcap(index: int, value: int, host: bool) -> None:
        # kvm_mtrr_set_msr refuses MTRRcap (msr_mtrr_valid: not a settable MTRR) -> #GP; a host
        # write of the same value is accepted (kvm_set_msr_common ignores it for migration).
        if not host or value != MTRRCAP_VALUE:
            raise MsrFault("MTRRcap is read-only")

    table.register(MSR_MTRRCAP, read=engine.read, write=write_mtrrcap, owner=owner)

    def read_tsc(index: int, host: bool) -> int:
        return tsc.read()

    def write_tsc(index: int, value: int, host: bool) -> None:
        if host:
            tsc.write(value)  # kvm_synchronize_tsc
        else:
            tsc.guest_write(value)
        on_tsc_write()

    table.register(MSR_IA32_TSC, read=read_tsc, write=write_tsc, owner=owner)

    def write_ucode_rev(index: int, value: int, host: bool) -> None:
        # kvm_set_msr_common, MSR_IA32_UCODE_REV: the guest's write (0, before CPUID, as Linux's
        # intel_get_microcode_revision does) is dropped; the host's sets the revision.
        if host:
            ucode.value = value

    def write_tsc_aux(index: int, value: int, host: bool) -> None:
        # kvm_set_msr_common, MSR_TSC_AUX: a guest write with bits 63:32 set is #GP (Intel).
        if not host and value >> 32:
            raise MsrFault(f"TSC_AUX {value:#x}: bits 63:32 are reserved")
        tsc_aux.value = value

    tsc_aux = MsrValue(0)
    table.register(MSR_TSC_AUX, read=tsc_aux.read, write=write_tsc_aux, owner=owner)
    #: The RDTSCP hook's source of ECX (the vCPU reads it straight from here).
    engine.tsc_aux = tsc_aux

    # vmx_set_msr, MSR_IA32_DEBUGCTLMSR: only the bits vmx_get_supported_debugctl allows, none here
    # (no LBR, no bus-lock detection): 0 reads back, anything else is #GP.
    debugctl = MsrValue(0, writable=0)
    table.register(MSR_IA32_DEBUGCTLMSR, read=debugctl.read, write=debugctl.write, owner=owner)

    ucode = MsrValue(UCODE_REV_RESET)
    table.register(MSR_IA32_UCODE_REV, read=ucode.read, write=write_ucode_rev, owner=owner)

    # Without an in-kernel LAPIC, KVM still keeps vcpu->arch.apic_base (kvm_set_apic_base); a local
    # APIC model replaces this handler (MsrTable.register(..., replace=True)).
    apic_base = MsrValue(
        APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE | (MSR_IA32_APICBASE_BSP if vcpu_id == 0 else 0),
        writable=0x000000FFFFFFF000 | MSR_IA32_APICBASE_ENABLE | MSR_IA32_APICBASE_BSP,
    )
    table.register(MSR_IA32_APICBASE, read=apic_base.read, write=apic_base.write, owner="vcpu apic_base")
