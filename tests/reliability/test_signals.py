"""Ctrl-C always works: SIGINT ends `pcihole run` with one line `pcihole: interrupted` and status 130,
SIGTERM with `pcihole: terminated` and 143, no traceback, on both backends, for a guest that never
exits (`jmp .`: the vCPU sits in KVM_RUN or in Unicorn's emu_start) and for one that exits all the
time (`out` in a loop: Python runs constantly, much of it inside the model's Unicorn callbacks).

Through the real command line in a child process. The guest writes 'R' to the serial port first
(streamed to stdout with --kernel), so the signal is sent once the guest runs (and half a second
later, into its loop, which is an ordering, not a measurement); --timeout 30 is
the generous bound: a run the signal did not end would end with a timeout error instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.backends import BACKENDS
from tests.guest_runner import KERNEL_GPA, pvh_kernel
from tests.guestasm import assemble

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
ENV.pop("PCIHOLE_KVM_DEVICE", None)
READY = "mov $0x3f8, %dx\nmov $'R', %al\nout %al, %dx\n"
GUESTS = {
    "never-exits": READY + "1: jmp 1b",
    "exits-constantly": READY + "1: out %al, $0x80\nincl 0x200000\njmp 1b",
    # With `--strategy exit` every read of an absent ECAM function exits; on kvm the C run loop
    # answers them all without returning to Python (hv/kvm/run_loop.c): only the kick gets it out.
    "reads-absent-ecam": READY + "mov $0xe0f00000, %esi\n1: mov (%esi), %eax\njmp 1b",
}
#: Options a guest needs (the default strategy would answer its reads without an exit).
GUEST_OPTIONS = {"reads-absent-ecam": ("--strategy", "exit")}
SIGNALS = [(signal.SIGINT, 130, "pcihole: interrupted"), (signal.SIGTERM, 143, "pcihole: terminated")]


def run_and_signal(
    tmp_path: Path,
    backend: str,
    source: str,
    signum: int,
    *,
    timeout: str = "30",
    options: tuple[str, ...] = (),
) -> tuple[int, str]:
    """Run the guest `source` (which writes 'R' to the serial port once it is going) through
    `pcihole run`, send `signum` half a second after the 'R': (exit status, stderr)."""
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(pvh_kernel(assemble(source, org=KERNEL_GPA)))
    cmd = [sys.executable, "-m", "pcihole.cli", "run", "--backend", backend, "--kernel", str(kernel)]
    proc = subprocess.Popen(
        [*cmd, *options, "--timeout", timeout],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.read(1) == "R", "the guest did not start"
        time.sleep(
            0.5
        )  # ordering only: let the guest get past its serial exit, into its loop (or timers fire)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("signum, status, line", SIGNALS, ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("guest", GUESTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_signal_ends_the_run_with_one_line_and_its_status(tmp_path, backend, guest, signum, status, line):
    returncode, err = run_and_signal(
        tmp_path, backend, GUESTS[guest], signum, options=GUEST_OPTIONS.get(guest, ())
    )
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.splitlines() == [line]
    assert returncode == status


def test_a_signal_ignored_by_the_parent_stays_ignored(tmp_path):
    """A background job of a non-interactive shell gets SIGINT ignored; pcihole keeps it so."""
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(pvh_kernel(assemble(GUESTS["never-exits"], org=KERNEL_GPA)))
    cmd = [sys.executable, "-m", "pcihole.cli", "run", "--backend", "model", "--kernel", str(kernel)]
    proc = subprocess.Popen(
        [*cmd, "--timeout", "2"],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.stdout is not None and proc.stdout.read(1) == "R"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "timeout" in err, err  # ran on to its --timeout


def test_signals_to_thread_calls_back_off_the_main_thread_and_restores_the_handlers():
    """The mechanism under the CLI: the C handler's wakeup byte reaches a helper thread, which
    calls back (the main thread may be in KVM_RUN or emu_start); leaving restores the handlers."""
    import threading

    from pcihole.host.signals import signals_to_thread

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen: list[tuple[int, bool]] = []
    done = threading.Event()

    def callback(signum: int) -> None:
        seen.append((signum, threading.current_thread() is threading.main_thread()))
        if len(seen) == 2:
            done.set()

    with signals_to_thread(callback):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert done.wait(10), seen
    assert seen == [(signal.SIGINT, False), (signal.SIGTERM, False)]
    assert {s: signal.getsignal(s) for s in before} == before
