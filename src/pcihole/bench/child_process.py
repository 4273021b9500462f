"""A child process the bench runs (QEMU, the peer it is compared with) that a stop ends promptly.

A SIGINT typed at a terminal reaches QEMU by itself (the terminal signals the whole foreground
process group), but a SIGTERM sent to pcihole alone (`kill PID`, a service manager) does not: the
bench would wait for QEMU's run to end (minutes for a Linux boot under TCG) before it stopped. So a
stop asked through the StopRelay terminates the child at once (SIGTERM, which QEMU handles:
"terminating on signal 15"), and kills it (SIGKILL) when it is still there GRACE_SECONDS later.
The child is always waited for, on every path out, so it is never left a zombie or an orphan.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass

from pcihole.machine.stop_request import StopRelay

#: How long a terminated child has to end before it is killed.
GRACE_SECONDS = 5.0
#: How often the waiting loop looks at the clock when the child is quiet.
POLL_SECONDS = 0.25
READ_SIZE = 65536


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    stderr: str
    #: a stop ended the child (its returncode is then the signal's, negative)
    stopped: bool


def run_child(
    command: Sequence[str],
    *,
    timeout: float,
    stops: StopRelay | None = None,
    on_stdout: Callable[[bytes], None] = lambda chunk: None,
    grace: float = GRACE_SECONDS,
) -> ChildResult:
    """Run `command` (stdin from /dev/null), handing its stdout to `on_stdout` as it comes and keeping
    its stderr. subprocess.TimeoutExpired (the child killed and reaped) if it runs past `timeout`
    seconds; OSError if it cannot be started."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    stopped = threading.Event()

    def terminate(_stop) -> None:
        stopped.set()
        with suppress(ProcessLookupError):
            proc.terminate()  # Popen does nothing once the child is reaped

    err = bytearray()
    readers: dict[int, Callable[[bytes], object]] = {
        proc.stdout.fileno(): on_stdout,
        proc.stderr.fileno(): err.extend,
    }
    deadline = time.monotonic() + timeout
    terminated_at: float | None = None
    try:
        with stops.calling(terminate) if stops is not None else nullcontext():
            while readers or proc.poll() is None:
                now = time.monotonic()
                if stopped.is_set():
                    terminated_at = now if terminated_at is None else terminated_at
                    if now - terminated_at >= grace:
                        proc.kill()
                elif now >= deadline:
                    raise subprocess.TimeoutExpired(list(command), timeout)
                if not readers:
                    time.sleep(POLL_SECONDS)
                    continue
                ready, _, _ = select.select(list(readers), [], [], POLL_SECONDS)
                for fd in ready:
                    chunk = os.read(fd, READ_SIZE)
                    if chunk:
                        readers[fd](chunk)
                    else:
                        del readers[fd]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return ChildResult(proc.returncode, err.decode(errors="replace"), stopped.is_set())
