"""The in-kernel local APIC, model vs kvm: the same long-mode guest programs the LAPIC timer (one-shot,
periodic, TSC-deadline), self-IPIs and TPR, and the results it stores must agree (KVM's lapic.c is
what both run: the model's hypervisor/model/lapic.py and this host's kernel)."""

from __future__ import annotations

import pytest

from pcihole.hv.msr_index import MSR_IA32_APICBASE
from pcihole.hv.uapi import cpuid2_with
from tests.backends import on_both_backends

from .irqchip_guest import (
    ICR,
    ISR,
    LVTT,
    PPR,
    TDCR,
    TMCCT,
    TMICT,
    TPR,
    TSC_DEADLINE_AT_HLT,
    TSC_DEADLINE_IN_HLT,
    counting_handler,
    run_irqchip_guest,
    tsc_deadline_handler,
    tsc_deadline_then_halt,
)
from .system_guest import RESULTS

TIMER_VECTOR = 0x40
ONE_MS = 1_000_000  # APIC bus cycles at KVM's 1 GHz with divide-by-1
APIC_BASE_ENABLED = 0xFEE00000 | 1 << 11 | 1 << 8  # the default base, enabled, BSP


@on_both_backends
def test_reset_registers_and_one_shot_timer(hypervisor):
    """ID, version (0x50014), LVT0 (ExtINT on the BSP), then a one-shot timer of 1 ms: its vector
    arrives once, the current count reads 0 after, and ISR / PPR are clear after the EOI."""
    body = f"""
    mov 0x20(%rsi), %eax
    mov %eax, {RESULTS + 0x100}
    mov 0x30(%rsi), %eax
    mov %eax, {RESULTS + 0x104}
    mov 0x350(%rsi), %eax
    mov %eax, {RESULTS + 0x108}
    movl $0xb, {TDCR}(%rsi)
    movl ${TIMER_VECTOR}, {LVTT}(%rsi)
    movl ${ONE_MS}, {TMICT}(%rsi)
1:  pause
    cmpq $1, {RESULTS}
    jb 1b
    mov $20000, %ecx
2:  pause
    loop 2b
    mov {TMCCT}(%rsi), %eax
    mov %eax, {RESULTS + 0x10C}
    mov {ISR + 0x40}(%rsi), %eax
    mov %eax, {RESULTS + 0x110}
    mov {PPR}(%rsi), %eax
    mov %eax, {RESULTS + 0x114}
    mov {TMICT}(%rsi), %eax
    mov %eax, {RESULTS + 0x118}
    out %al, $0x80
"""
    run = run_irqchip_guest(hypervisor, body, [counting_handler(TIMER_VECTOR, 0)])
    assert not run.stuck
    regs = [int.from_bytes(run.results[0x100 + 4 * i : 0x104 + 4 * i], "little") for i in range(7)]
    lapic_id, version, lvt0, tmcct, isr2, ppr, tmict = regs
    assert (lapic_id, version, lvt0) == (0, 0x50014, 0x700)
    assert run.q(0) == 1 and run.log() == [TIMER_VECTOR]
    assert (tmcct, isr2, ppr, tmict) == (0, 0, 0, ONE_MS)


@on_both_backends
def test_periodic_timer_wakes_hlt(hypervisor):
    """Periodic, 2 ms: the guest sleeps in HLT (no KVM_EXIT_HLT: the irqchip handles it) and each
    tick wakes it; after three it masks the LVT and stops the count."""
    body = f"""
    movl $0xb, {TDCR}(%rsi)
    movl ${TIMER_VECTOR | 0x20000}, {LVTT}(%rsi)
    movl ${2 * ONE_MS}, {TMICT}(%rsi)
1:  hlt
    cmpq $3, {RESULTS}
    jb 1b
    movl ${TIMER_VECTOR | 0x30000}, {LVTT}(%rsi)
    movl $0, {TMICT}(%rsi)
    mov {LVTT}(%rsi), %eax
    mov %eax, {RESULTS + 0x100}
    out %al, $0x80
"""
    run = run_irqchip_guest(hypervisor, body, [counting_handler(TIMER_VECTOR, 0)])
    assert not run.stuck
    assert run.hlt_exits() == 0
    assert run.q(0) >= 3 and set(run.log()) == {TIMER_VECTOR}
    assert int.from_bytes(run.results[0x100:0x104], "little") == TIMER_VECTOR | 0x30000


def _tsc(hypervisor, vcpu) -> int:
    """The guest's TSC now (KVM_GET_MSRS of IA32_TSC on kvm; the model's TSC clock)."""
    return vcpu.get_msrs([0x10])[0x10] if hypervisor.name == "kvm" else vcpu.tsc.read()


def _set_msr(hypervisor, vcpu, index: int, value: int) -> None:
    if hypervisor.name == "kvm":
        vcpu.set_msrs({index: value})
    else:
        vcpu.msrs.write(index, value, host=True)


def _get_msr(hypervisor, vcpu, index: int) -> int:
    return vcpu.get_msrs([index])[index] if hypervisor.name == "kvm" else vcpu.msrs.read(index, host=True)


@on_both_backends
def test_tsc_deadline_timer(hypervisor):
    """TSC-deadline mode (LVTT bits 18:17 = 2): at the guest's first request the host writes
    IA32_TSC_DEADLINE (0x6e0) a few ms past the guest's TSC while the guest then sleeps in HLT;
    the vector arrives once, and at the second request the MSR reads 0
    (kvm_apic_inject_pending_timer_irqs clears it)."""
    deadlines = []

    def request(vm, vcpu, code):
        if not deadlines:
            _set_msr(hypervisor, vcpu, 0x6E0, _tsc(hypervisor, vcpu) + 10_000_000)
        deadlines.append(_get_msr(hypervisor, vcpu, 0x6E0))

    body = f"""
    movl ${TIMER_VECTOR | 0x40000}, {LVTT}(%rsi)
    out %al, $0x81
1:  hlt
    cmpq $1, {RESULTS}
    jb 1b
    out %al, $0x81
    out %al, $0x80
"""
    run = run_irqchip_guest(hypervisor, body, [counting_handler(TIMER_VECTOR, 0)], on_request=request)
    assert not run.stuck
    assert len(deadlines) == 2 and deadlines[0] != 0 and deadlines[1] == 0
    assert run.hlt_exits() == 0
    assert run.q(0) == 1 and run.log() == [TIMER_VECTOR]


@on_both_backends
def test_two_pending_vectors_higher_priority_first(hypervisor):
    """TPR 0xf0 holds back two self-IPIs (0x50, then 0x90), which wait in IRR; TPR 0 lets them in:
    0x90 first, and 0x50 only after 0x90's EOI (PPR = 0x90 while it is in service)."""
    low, high = 0x50, 0x90
    read_ppr = f"mov {PPR}(%rsi), %ebx\n mov %ebx, {RESULTS + 0x100}(,%rax,4)"
    body = f"""
    movl $0xf0, {TPR}(%rsi)
    movl ${0x40000 | low}, {ICR}(%rsi)
    movl ${0x40000 | high}, {ICR}(%rsi)
    mov {0x200 + 0x10 * (low // 32)}(%rsi), %eax
    mov %eax, {RESULTS + 0x140}
    mov {0x200 + 0x10 * (high // 32)}(%rsi), %eax
    mov %eax, {RESULTS + 0x144}
    movl $0, {TPR}(%rsi)
1:  pause
    cmpq $2, {RESULTS + 0x80}
    jb 1b
    mov {PPR}(%rsi), %eax
    mov %eax, {RESULTS + 0x148}
    out %al, $0x80
"""
    handlers = [
        counting_handler(low, 0, extra=read_ppr),
        counting_handler(high, 1, extra=read_ppr),
    ]
    run = run_irqchip_guest(hypervisor, body, handlers)
    assert not run.stuck
    assert run.log() == [high, low]
    # each handler stored PPR at RESULTS + 0x100 + 4 * (its place in the log)
    ppr_in_high, ppr_in_low, irr_low, irr_high, ppr_after = (
        int.from_bytes(run.results[o : o + 4], "little") for o in (0x100, 0x104, 0x140, 0x144, 0x148)
    )
    if hypervisor.name == "model":
        # SDM 10.8.3.1 and KVM's apic_update_ppr: the in-service vector's class. This host's KVM
        # (PVM) reads PPR 0 and ISR empty inside the handler (measured), so only the order is
        # compared with it.
        assert (ppr_in_high, ppr_in_low) == (high & 0xF0, low & 0xF0)
    assert irr_low == 1 << (low % 32) and irr_high == 1 << (high % 32)
    assert ppr_after == 0


X2APIC_EOI = "mov $0x80b, %ecx\n xor %eax, %eax\n xor %edx, %edx\n wrmsr\n"


@on_both_backends
def test_x2apic_msrs_from_the_guest(hypervisor):
    """The guest switches to x2APIC (IA32_APIC_BASE bit 10, CPUID offers it), reads its 32-bit ID
    (0x802) and version (0x803), sends itself vector 0x50 through SELF_IPI (0x83f) and 0x51 through
    the 64-bit ICR (0x830), EOIs through 0x80b; the xAPIC page then reads all-ones."""
    body = f"""
    mov $0x1b, %ecx
    rdmsr
    or $0x400, %eax
    wrmsr
    mov $0x802, %ecx
    rdmsr
    mov %eax, {RESULTS + 0x100}
    mov $0x803, %ecx
    rdmsr
    mov %eax, {RESULTS + 0x104}
    mov $0x83f, %ecx
    mov $0x50, %eax
    xor %edx, %edx
    wrmsr
    {"1: pause; cmpq $1, " + str(RESULTS + 0x80) + "; jb 1b"}
    mov $0x830, %ecx
    mov $0x40051, %eax
    xor %edx, %edx
    wrmsr
    {"2: pause; cmpq $2, " + str(RESULTS + 0x80) + "; jb 2b"}
    mov 0x30(%rsi), %eax
    mov %eax, {RESULTS + 0x108}
    mov $0x1b, %ecx
    rdmsr
    mov %eax, {RESULTS + 0x10C}
    out %al, $0x80
"""
    handlers = [
        counting_handler(0x50, 0, eoi=False, extra=X2APIC_EOI),
        counting_handler(0x51, 1, eoi=False, extra=X2APIC_EOI),
    ]
    run = run_irqchip_guest(hypervisor, body, handlers)
    assert not run.stuck, run.exits[-3:]
    x2apic_id, version, xapic_page, apic_base = (
        int.from_bytes(run.results[o : o + 4], "little") for o in (0x100, 0x104, 0x108, 0x10C)
    )
    assert (x2apic_id, version) == (0, 0x50014)
    assert run.log() == [0x50, 0x51]
    assert xapic_page == 0xFFFFFFFF
    assert apic_base == 0xFEE00D00


@on_both_backends
def test_tsc_deadline_written_by_the_guest(hypervisor):
    """WRMSR IA32_TSC_DEADLINE from the guest, RDTSC + 20,000,000 (20 ms at 1 GHz, or less), then
    HLT: the timer's vector arrives once, after the WRMSR (at the HLT or in it: the handler counts
    where, tsc_deadline_handler), and the MSR reads 0 once it has fired. No time margin decides the
    verdict: an interrupt taken before the HLT ran is returned past it, so a vCPU thread preempted
    for longer than the deadline (the model's first arm once waited for its timer thread to start:
    tests/model/test_host_timer.py) still ends."""
    read_deadline = f"""
    mov $0x6e0, %ecx
    rdmsr
    mov %eax, {RESULTS + 0x100}
    out %al, $0x80
"""
    run = run_irqchip_guest(
        hypervisor, tsc_deadline_then_halt(TIMER_VECTOR) + read_deadline, [tsc_deadline_handler(TIMER_VECTOR)]
    )
    assert not run.stuck, run.exits[-3:]
    assert run.q(0) == 1 and run.log() == [TIMER_VECTOR]
    at_hlt, in_hlt = run.q(TSC_DEADLINE_AT_HLT), run.q(TSC_DEADLINE_IN_HLT)
    assert (at_hlt, in_hlt) in ((1, 0), (0, 1)), (at_hlt, in_hlt)
    assert int.from_bytes(run.results[0x100:0x104], "little") == 0


def _cpuid_with_width(hypervisor, width: int | None):
    """KVM_GET_SUPPORTED_CPUID with leaf 0x80000008 EAX[7:0] (MAXPHYADDR) set to `width` (None: as
    supported)."""
    supported = hypervisor.get_supported_cpuid()
    table = cpuid2_with(supported.nent)()
    table.nent = supported.nent
    for i in range(supported.nent):
        table.entries[i] = supported.entries[i]
        if table.entries[i].function == 0x80000008 and width is not None:
            table.entries[i].eax = (table.entries[i].eax & ~0xFF) | width
    return table


def _apic_base_bits_refused(hypervisor, width: int | None) -> list[int]:
    """Of the address bits 32..51, those KVM_SET_MSRS of IA32_APIC_BASE (enabled, the default base)
    refuses after KVM_SET_CPUID2 with MAXPHYADDR `width` (None: no KVM_SET_CPUID2 at all)."""
    vm = hypervisor.create_vm()
    try:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        if width is not None:
            vcpu.set_cpuid2(_cpuid_with_width(hypervisor, width))
        refused = []
        for bit in range(32, 52):
            try:
                vcpu.set_msrs({MSR_IA32_APICBASE: APIC_BASE_ENABLED | 1 << bit})
            except OSError:
                refused.append(bit)
        return refused
    finally:
        vm.close()


@on_both_backends
@pytest.mark.parametrize("width", [None, 39, 44])
def test_apic_base_reserved_bits_follow_the_cpuid_width(hypervisor, width):
    """kvm_apic_set_base refuses IA32_APIC_BASE with a bit at or above the guest's MAXPHYADDR
    (kvm_vcpu_reserved_gpa_bits_raw: vcpu->arch.maxphyaddr, which cpuid_query_maxphyaddr takes
    from CPUID 0x80000008, and is 36 before KVM_SET_CPUID2), host writes included."""
    maxphyaddr = 36 if width is None else width
    assert _apic_base_bits_refused(hypervisor, width) == list(range(maxphyaddr, 52))
