"""StopRelay: one stop from outside (a signal) for a sequence of runs, as `pcihole bench` makes them.

On /dev/kvm with tiny guests. A run's own ending (its timeout watchdog) must not end the next run,
which a StopRequest shared by the runs did (the watchdog records a TIMEOUT on it, and a StopRequest
with a stop returns it at once); a signal must end the run in progress (a guest spinning in
KVM_RUN) and every later one.
"""

from __future__ import annotations

import threading
from contextlib import closing

import pytest

from pcihole.machine.dispatch import Stop, StopReason
from pcihole.machine.run_loop import run_until_stop
from pcihole.machine.stop_request import StopRelay, StopRequest
from tests.machine.test_run_loop import boot

pytestmark = pytest.mark.kvm

SPIN = "1: jmp 1b"
EXIT_3 = "mov $0xf4, %dx\nmov $3, %al\nout %al, %dx\nhlt"
HANG_BOUND = 120.0  # only catches a run nothing stopped


def run_once(kvm, source: str, stops: StopRequest, timeout: float = HANG_BOUND) -> Stop:
    with closing(kvm.create_vm()) as vm:
        ram, vcpu, handler, _serial, _stats = boot(vm, source)
        try:
            return run_until_stop(vcpu, handler, timeout=timeout, stops=stops)
        finally:
            vcpu.close()
            ram.close()


def test_a_timeout_ends_its_own_run_only(kvm):
    relay = StopRelay()
    assert run_once(kvm, SPIN, relay.for_run(), timeout=0.3).reason == StopReason.TIMEOUT
    stop = run_once(kvm, EXIT_3, relay.for_run())
    assert (stop.reason, stop.status) == (StopReason.DEBUG_EXIT, 3)
    assert relay.stop is None


def test_one_shared_stop_request_would_end_the_next_run_at_once(kvm):
    """What StopRelay is for: the same two runs on one StopRequest."""
    shared = StopRequest()
    assert run_once(kvm, SPIN, shared, timeout=0.3).reason == StopReason.TIMEOUT
    assert run_once(kvm, EXIT_3, shared).reason == StopReason.TIMEOUT


def test_a_signal_ends_the_run_in_progress_and_every_later_one(kvm):
    relay = StopRelay()
    signal_stop = Stop(StopReason.SIGNAL, status=2)
    run = relay.for_run()
    # Ask once the vCPU is attached, i.e. inside the run (the ordering, not a time).
    asker = threading.Thread(target=lambda: (_wait_attached(run), relay.request(signal_stop)))
    asker.start()
    try:
        assert run_once(kvm, SPIN, run) == signal_stop
    finally:
        asker.join()
    assert relay.stop == signal_stop
    assert run_once(kvm, EXIT_3, relay.for_run()) == signal_stop  # never entered the guest's exit


def _wait_attached(run: StopRequest) -> None:
    event = threading.Event()
    while run._vcpu is None:
        event.wait(0.001)
