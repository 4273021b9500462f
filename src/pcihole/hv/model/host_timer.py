"""`HostTimer`: a one-shot timer on the host's monotonic clock, the model's hrtimer.

KVM's timers (the LAPIC timer, the PIT) are hrtimers: armed with an absolute CLOCK_MONOTONIC
expiry, their callback runs on the host and may restart them (HRTIMER_RESTART with a new expiry:
the periodic modes). The model's runs on one host thread per timer, started with the timer (as
kvm_create_lapic / kvm_create_pit set their hrtimers up) and joined by close(). Arming never starts
a thread: start() is called from the guest's own WRMSR IA32_TSC_DEADLINE or TMICT write, and
threading.Thread.start() waits until the new thread has been scheduled, measured at up to 6 ms on
a loaded host, long enough for a deadline 2 ms ahead to pass before the guest's next instruction
(the guest then takes the interrupt before its HLT, and sleeps in the HLT for good). The callback runs without the timer's lock, so it may take the irqchip's; a
start() or cancel() made while it runs wins over the expiry it returns (hrtimer_cancel waits for
a running callback; here the generation count discards its restart instead).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

NS_PER_S = 1_000_000_000

#: expired() -> the next absolute expiry in ns (HRTIMER_RESTART) or None (HRTIMER_NORESTART).
Expired = Callable[[], int | None]


class HostTimer:
    def __init__(self, name: str, expired: Expired, *, now_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.name = name
        self._expired = expired
        self._now_ns = now_ns
        self._cond = threading.Condition()
        self._deadline: int | None = None
        self._generation = 0
        self._closed = False
        #: How many times the callback ran (for tests and statistics).
        self.fired = 0
        self._thread = threading.Thread(target=self._loop, name=f"pcihole-{self.name}", daemon=True)
        self._thread.start()

    def start(self, deadline_ns: int) -> None:
        """hrtimer_start(HRTIMER_MODE_ABS): expire at host monotonic time `deadline_ns`."""
        with self._cond:
            if self._closed:
                return
            self._deadline = deadline_ns
            self._generation += 1
            self._cond.notify_all()

    def cancel(self) -> None:
        """hrtimer_cancel: no expiry until the next start()."""
        with self._cond:
            self._deadline = None
            self._generation += 1
            self._cond.notify_all()

    @property
    def armed(self) -> bool:
        return self._deadline is not None

    def close(self) -> None:
        """Stop for good and join the thread (unless called from the callback itself)."""
        with self._cond:
            self._closed = True
            self._deadline = None
            self._cond.notify_all()
            thread = self._thread
        if thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                deadline = self._deadline
                if deadline is None:
                    self._cond.wait()
                    continue
                now = self._now_ns()
                if now < deadline:
                    self._cond.wait((deadline - now) / NS_PER_S)
                    continue
                self._deadline = None
                generation = self._generation
                self._cond.release()
                try:
                    self.fired += 1
                    restart = self._expired()
                finally:
                    self._cond.acquire()
                if restart is not None and generation == self._generation and not self._closed:
                    self._deadline = restart
