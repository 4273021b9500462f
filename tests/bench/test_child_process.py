"""bench/child_process.py: a stop ends the bench's child process (QEMU) at once, SIGTERM first and
SIGKILL after the grace period, and the child is reaped on every path (no zombie, no orphan).

Real children (sh, sleep) that print their pid and then wait for ever, so that only the stop, the
kill or the timeout can end them; the stop is asked from their own output (an ordering, no clock).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from pcihole.bench.child_process import run_child
from pcihole.machine.dispatch import Stop, StopReason
from pcihole.machine.stop_request import StopRelay

FOREVER = "echo $$; exec sleep 1000"
#: An ignored signal stays ignored across exec: this child outlives SIGTERM.
DEAF_TO_SIGTERM = "trap '' TERM; echo $$; exec sleep 1000"
SIGTERM_STOP = Stop(StopReason.SIGNAL, status=signal.SIGTERM)
BOUND = 60.0  # only catches a child nothing ended


def gone(pid: int) -> bool:
    """No process, not even a zombie, has this pid (the child was reaped)."""
    return not Path(f"/proc/{pid}").exists()


def run_and_stop(script: str, grace: float = 5.0):
    relay = StopRelay()
    pids: list[int] = []

    def on_stdout(chunk: bytes) -> None:
        pids.append(int(chunk.split()[0]))
        relay.request(SIGTERM_STOP)  # the child is running: stop it now

    result = run_child(["sh", "-c", script], timeout=BOUND, stops=relay, on_stdout=on_stdout, grace=grace)
    return result, pids[0]


def test_a_stop_terminates_the_child_and_reaps_it():
    result, pid = run_and_stop(FOREVER)
    assert result.stopped
    assert result.returncode == -signal.SIGTERM
    assert gone(pid)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period():
    result, pid = run_and_stop(DEAF_TO_SIGTERM, grace=0.2)
    assert result.stopped
    assert result.returncode == -signal.SIGKILL
    assert gone(pid)


def test_a_stop_asked_before_the_child_starts_ends_it_at_once():
    relay = StopRelay()
    relay.request(SIGTERM_STOP)
    result = run_child(["sleep", "1000"], timeout=BOUND, stops=relay)
    assert result.stopped and result.returncode == -signal.SIGTERM


def test_a_child_past_its_timeout_is_killed_and_reaped():
    pids: list[int] = []
    with pytest.raises(subprocess.TimeoutExpired):
        run_child(["sh", "-c", FOREVER], timeout=0.5, on_stdout=lambda c: pids.append(int(c.split()[0])))
    assert gone(pids[0])


def test_output_and_status_of_a_child_that_ends_by_itself():
    out = bytearray()
    relay = StopRelay()
    result = run_child(
        ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=BOUND, stops=relay, on_stdout=out.extend
    )
    assert (bytes(out), result.stderr, result.returncode, result.stopped) == (b"out\n", "err\n", 3, False)
    relay.request(SIGTERM_STOP)  # after the child: nothing is left to call
