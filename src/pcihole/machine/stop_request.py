"""A stop asked for from outside the vCPU's thread: a signal, the --timeout watchdog.

The vCPU thread may be deep in KVM_RUN (or in Unicorn's emu_start), where nothing it runs looks at
a flag, so a request records the Stop and kicks the vCPU (Vcpu.kick: immediate_exit plus a signal
on kvm, a boundary hook on the model), and the run loop returns the Stop at the exit that follows.
The first request wins. A request made while no vCPU is attached (before the run, or after it) is
only recorded: run_until_stop returns it at once.

The lock orders kicks against detach(), so that no thread kicks a vCPU that is being closed (the
kvm vCPU's kvm_run mapping is gone then). It is never taken from a Python signal handler, which
may run in the middle of the vCPU thread's own code (host/signals.py hands signals to a thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pcihole.hv.interface import Vcpu
from pcihole.machine.dispatch import Stop


class StopRequest:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vcpu: Vcpu | None = None
        self.stop: Stop | None = None

    def request(self, stop: Stop) -> None:
        """Ask the run to end with `stop` (from any thread, not from a signal handler)."""
        with self._lock:
            if self.stop is None:
                self.stop = stop
            if self._vcpu is not None:
                self._vcpu.kick()

    def attach(self, vcpu: Vcpu) -> None:
        with self._lock:
            self._vcpu = vcpu

    def detach(self) -> None:
        with self._lock:
            self._vcpu = None


class StopRelay:
    """A stop asked from outside (a signal) for a sequence of runs (`pcihole bench`): it stops the run
    in progress and every later one. Each run gets its own StopRequest from `for_run()`, so that what
    ends one run (its --timeout watchdog, which requests a TIMEOUT stop on it) does not end the next
    ones, as a StopRequest shared by all the runs would."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: StopRequest | None = None
        self._callbacks: list[Callable[[Stop], None]] = []
        self.stop: Stop | None = None

    def request(self, stop: Stop) -> None:
        """Stop the run in progress, if any, and every later one (from any thread, not a handler)."""
        with self._lock:
            if self.stop is None:
                self.stop = stop
            current = self._current
            callbacks = list(self._callbacks)
        if current is not None:
            current.request(stop)
        for callback in callbacks:
            callback(self.stop)

    @contextmanager
    def calling(self, callback: Callable[[Stop], None]) -> Iterator[None]:
        """While inside, a stop asked calls `callback(stop)` (from the asking thread), and at once if
        one was asked already: for what a vCPU kick does not reach, such as a child process."""
        with self._lock:
            self._callbacks.append(callback)
            asked = self.stop
        try:
            if asked is not None:
                callback(asked)
            yield
        finally:
            with self._lock:
                self._callbacks.remove(callback)

    def for_run(self) -> StopRequest:
        """The StopRequest of the next run (already stopped if a stop was asked)."""
        run = StopRequest()
        with self._lock:
            if self.stop is not None:
                run.request(self.stop)
            self._current = run
        return run
