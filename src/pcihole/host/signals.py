"""Hand SIGINT / SIGTERM to a thread, so that a callback runs even while the main thread sits in C.

Python runs a signal handler only in the main thread, between two bytecodes. A vCPU spends its time
in one C call (KVM_RUN through ctypes, or Unicorn's emu_start) that may not return for as long as
the guest runs, and where the model's vCPU does run Python, it is inside a ctypes callback, where a
KeyboardInterrupt is printed and swallowed ("Exception ignored on calling ctypes callback") and
the guest runs on. So the handlers installed here do nothing themselves; the C-level handler
writes the signal number to a wakeup fd (signal.set_wakeup_fd), which a thread reads, and that
thread calls `callback(signum)`: it may take locks and kick a vCPU, which a handler must not.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler: the wakeup fd carries the signal (the module docstring)."""


@contextmanager
def signals_to_thread(callback: Callable[[signal.Signals], None]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM (unless ignored) call `callback` in a helper thread instead
    of their default action. Main thread only (signal.signal's rule)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # set_wakeup_fd's rule: the C handler must never block

    def watch() -> None:
        while data := os.read(read_end, 64):
            for signum in data:
                if signum in HANDLED:
                    callback(signal.Signals(signum))

    thread = threading.Thread(target=watch, name="pcihole-signals", daemon=True)
    thread.start()
    # A signal the parent set to be ignored (a background job of a non-interactive shell gets
    # SIGINT ignored) stays ignored, as it would with the default handlers.
    previous = {s: signal.signal(s, _ignore) for s in HANDLED if signal.getsignal(s) is not signal.SIG_IGN}
    old_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        os.close(write_end)  # the watcher reads end-of-file and returns
        thread.join()
        os.close(read_end)
