"""The model's in-kernel timers never hang or crash pcihole: a kick, a close from another thread, or
Ctrl-C while the LAPIC timer and the PIT are armed and firing.

In process: a guest sleeps in HLT (or spins) while its LAPIC timer ticks every 200 us; run() must
return Interrupted for each kick (the ticks keep coming), and a close from another thread must end
run() with EBADF and leave no timer thread behind. Through the command line: a PVH guest that arms
the PIT (mode 2) and the LAPIC timer, then spins; SIGINT must end it with one line and 130.
"""

from __future__ import annotations

import errno
import signal
import threading
import time

import pytest

from pcihole.hv import exits, open_backend
from tests.model.irqchip_guest import LVTT, TDCR, TMICT, counting_handler, run_irqchip_guest
from tests.reliability.test_signals import run_and_signal

TIMER_VECTOR = 0x40
# Periodic, every 200 us (KVM's shortest period), delivered to the guest's handler.
PERIODIC_200US = f"""
    movl $0xb, {TDCR}(%rsi)
    movl ${TIMER_VECTOR | 0x20000}, {LVTT}(%rsi)
    movl $200000, {TMICT}(%rsi)
"""


def _timer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("pcihole-lapic", "pcihole-pit"))]


@pytest.mark.parametrize("wait", ["hlt", "pause"])
def test_kicks_while_the_timer_fires_then_close_from_another_thread(wait):
    """Five kicks, each an Interrupted run() while timer interrupts arrive; then close() from another
    thread ends the running vCPU with EBADF; no timer thread is left."""
    hv = open_backend("model")
    outcome: dict[str, object] = {}

    def setup(vm, vcpu):
        def drive():
            interrupted = 0
            while interrupted < 5:
                time.sleep(0.05)  # ordering only: let ticks arrive between kicks
                vcpu.kick()
                interrupted += 1
            outcome["ticks_before_close"] = vcpu.lapic.interrupts_accepted
            vm.close()

        threading.Thread(target=drive, name="test-driver", daemon=True).start()

    body = PERIODIC_200US + f"1: {wait}\n jmp 1b\n"
    try:
        with pytest.raises(OSError) as closed:
            run_irqchip_guest(hv, body, [counting_handler(TIMER_VECTOR, 0)], setup=setup)
        assert closed.value.errno == errno.EBADF
    finally:
        hv.close()
    assert isinstance(outcome["ticks_before_close"], int) and outcome["ticks_before_close"] > 0
    assert _timer_threads() == []


def test_every_kick_returns_interrupted_while_halted_with_a_timer():
    """run() returns Interrupted for the kicks while the guest sleeps in HLT between timer
    interrupts, and never Hlt; an IOAPIC interrupt then ends it."""
    hv = open_backend("model")
    seen: list[object] = []

    def ready(vm, vcpu, code):
        """The guest has masked the 8259s and programmed pin 5 (a GSI raised before would reach
        it through the unmasked 8259s as ExtINT vector 5, for which it has no gate)."""

        def kick_then_finish():
            for _ in range(3):
                time.sleep(0.02)  # ordering only: let ticks arrive between kicks
                vcpu.kick()
            time.sleep(0.02)
            vm.set_irq_line(5, True)  # the guest's signal to finish (IOAPIC pin 5 -> 0x45)

        threading.Thread(target=kick_then_finish, daemon=True).start()

    body = (
        "mov $0xff, %al\n out %al, $0x21\n out %al, $0xa1\n"
        "movl $0x1b, (%rdi)\n movl $0, 0x10(%rdi)\n movl $0x1a, (%rdi)\n movl $0x45, 0x10(%rdi)\n"
        + PERIODIC_200US
        + "out %al, $0x81\n"
        + "1: hlt\n cmpq $1, 0x7008\n jb 1b\n out %al, $0x80\n"
    )
    try:
        run = run_irqchip_guest(
            hv, body, [counting_handler(TIMER_VECTOR, 0), counting_handler(0x45, 1)], on_request=ready
        )
        seen = run.exits
    finally:
        hv.close()
    assert run.q(0) > 0  # timer interrupts reached the guest meanwhile
    # each kick ends the run it meets; two that meet the same run (the host thread slower than 20
    # ms to run again) are one, as KVM's immediate_exit is a flag
    assert 1 <= sum(isinstance(e, exits.Interrupted) for e in seen) <= 3
    assert not any(isinstance(e, exits.Hlt) for e in seen)
    assert _timer_threads() == []


ARMED_AND_SPINNING = """
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    mov $0x34, %al
    out %al, $0x43
    mov $0xa9, %al
    out %al, $0x40
    mov $0x04, %al
    out %al, $0x40
    movl $0x1ff, 0xfee000f0
    movl $0x10040, 0xfee00320
    movl $0xf0000000, 0xfee00380
    mov $0x3f8, %dx
    mov $'R', %al
    out %al, %dx
1:  jmp 1b
"""


def test_ctrl_c_while_the_pit_and_the_lapic_timer_are_armed(tmp_path):
    """32-bit PVH guest: PIT channel 0 at 1 kHz, the LAPIC timer armed (LVT masked: no IDT), then a
    spin; SIGINT ends `pcihole run --backend model` with one line and status 130."""
    returncode, err = run_and_signal(tmp_path, "model", ARMED_AND_SPINNING, signal.SIGINT, timeout="60")
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.splitlines() == ["pcihole: interrupted"]
    assert returncode == 130
