"""A wake-up from HLT never takes the model's engine out of emu_start: every return from
uc_emu_start flushes Unicorn's translation cache, so an idle guest woken by its timer would
retranslate its code at every tick. The vCPU sleeps inside the HLT intercept's callback instead
(msr_intercept.py, vcpu.py); `ModelVcpu.engine_starts` counts the uc_emu_start calls."""

from __future__ import annotations

from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from pcihole.hv.x86_cpu_state import enter_protected_mode_flat
from tests.guestasm import assemble

from .irqchip_guest import LVTT, RESULTS, TDCR, TMICT, counting_handler, run_irqchip_guest
from .test_halt_with_interrupt_source import Guest, address_of, fire_and_notify, port_out

TIMER_VECTOR = 0x40
WAKEUPS = 25
HALF_MS = 500_000  # APIC bus cycles at 1 GHz with divide-by-1


def test_idle_guest_wakes_from_hlt_on_each_tick_in_one_engine_start(model_hv):
    """A periodic LAPIC timer wakes a HLT loop WAKEUPS times: no KVM_EXIT_HLT, and the engine
    started once for the whole run."""
    body = f"""
    movl $0xb, {TDCR}(%rsi)
    movl ${TIMER_VECTOR | 0x20000}, {LVTT}(%rsi)
    movl ${HALF_MS}, {TMICT}(%rsi)
1:  hlt
    incq {RESULTS + 0x100}
    cmpq ${WAKEUPS}, {RESULTS + 0x100}
    jb 1b
    movl $0, {TMICT}(%rsi)
    out %al, $0x80
"""
    vcpus = []
    run = run_irqchip_guest(
        model_hv, body, [counting_handler(TIMER_VECTOR, 0)], setup=lambda vm, vcpu: vcpus.append(vcpu)
    )
    assert not run.stuck
    assert run.hlt_exits() == 0
    ticks, wakeups = run.q(0), run.q(0x20)
    assert wakeups == WAKEUPS and ticks >= WAKEUPS  # a HLT ends only at a tick
    assert vcpus[0].engine_starts == 1


def test_kicks_while_halted_cost_one_engine_start(model_hv):
    """A kick leaves the engine (run() returns Interrupted from outside emu_start); the vCPU then
    sleeps outside it, so more kicks and the wake-up start it once more, not once each."""
    guest = Guest(model_hv, "sti\n hlt\n out %al, $0x80")
    try:
        for _ in range(3):
            guest.later(guest.vcpu.kick)  # while run() sleeps in the HLT
            assert guest.vcpu.run() == exits.Interrupted()
        guest.later(lambda: fire_and_notify(guest))
        assert port_out(guest.vcpu.run()) == 0x80
        assert guest.handled() == (address_of(guest.body, "out %al, $0x80"), 1)
        assert guest.vcpu.engine_starts <= 2
    finally:
        guest.close()


def test_hlt_without_a_source_exits_with_eip_after_it(model_hv):
    """No irqchip: KVM_EXIT_HLT with EIP after the HLT (the intercept moved it), and the next
    KVM_RUN goes on from there."""
    vm = model_hv.create_vm()
    ram = HostMapping.anonymous(0x10000)
    try:
        code = assemble("hlt\n hlt\n mov $7, %al\n out %al, $0x80", org=0x1000)
        ram.write(0x1000, code)
        vm.set_user_memory_region(0, 0, 0, 0x10000, ram.addr)
        vcpu = vm.create_vcpu(0)
        enter_protected_mode_flat(vcpu, 0x1000, esp=0x8000)
        assert vcpu.run() == exits.Hlt()
        assert vcpu.get_regs().rip == 0x1001
        assert vcpu.run() == exits.Hlt()
        assert vcpu.get_regs().rip == 0x1002
        assert vcpu.run() == exits.IoOut(0x80, 1, b"\x07")
    finally:
        vm.close()
        ram.close()
