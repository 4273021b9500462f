"""The model's hrtimer (hv/model/host_timer.py): arming it never waits for a host thread to start.

The guest arms the LAPIC timer itself (WRMSR IA32_TSC_DEADLINE, a TMICT write) and goes on at once to
HLT; hrtimer_start only queues the timer. Were a host thread started at that point, the guest's next
instruction would wait for the host to schedule it (milliseconds on a loaded host), and a deadline due
meanwhile would be taken before the HLT, which then slept for good (the guest's handler now returns
past an HLT it interrupts before it ran: irqchip_guest.tsc_deadline_handler). These tests forbid
starting a timer thread once the timers exist, so that a thread started at the arm fails every time
instead of showing now and then as a late interrupt.
"""

from __future__ import annotations

import threading

import pytest

from pcihole.hv.model.host_timer import HostTimer
from pcihole.hv.model.system import ModelKvm

from .irqchip_guest import run_irqchip_guest, tsc_deadline_handler, tsc_deadline_then_halt

WAIT_S = 30.0  # a failure guard only: the expiries below are due at once


@pytest.fixture
def no_new_timer_threads(monkeypatch):
    """From the fixture's `forbid()` on, starting a `pcihole-` thread raises (others still start:
    the irqchip harness's own stuck-run timer)."""
    started = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name.startswith("pcihole-"):
            raise AssertionError(f"thread {self.name} started after the timers were created")
        started(self)

    def forbid() -> None:
        monkeypatch.setattr(threading.Thread, "start", start)

    return forbid


def test_start_arms_without_starting_a_thread(no_new_timer_threads):
    fired = threading.Event()

    def expired() -> None:
        fired.set()

    timer = HostTimer("test-timer", expired)
    try:
        no_new_timer_threads()
        timer.start(0)  # a deadline already past: the thread made with the timer takes it
        assert fired.wait(WAIT_S)
        assert timer.fired == 1 and not timer.armed
    finally:
        timer.close()


def test_guest_tsc_deadline_arms_without_starting_a_thread(no_new_timer_threads):
    """The guest of test_differential_lapic.py's test_tsc_deadline_written_by_the_guest, whose
    WRMSR is the LAPIC timer's first arm: it must not start a thread."""
    body = tsc_deadline_then_halt(0x40) + "    out %al, $0x80\n"
    run = run_irqchip_guest(
        ModelKvm(), body, [tsc_deadline_handler(0x40)], setup=lambda vm, vcpu: no_new_timer_threads()
    )
    assert not run.stuck, run.exits[-3:]
    assert run.q(0) == 1 and run.log() == [0x40]
