"""Ctrl-C works in `pcihole bench` as in `pcihole run`: SIGINT ends it with one line `pcihole:
interrupted` and status 130, SIGTERM with `pcihole: terminated` and 143, no traceback, and no result
file is left behind, neither a complete-looking one nor the temporary directory they are written in.

Through the real command line in a child process, on each backend alone. The progress bar prints a
line (stderr, not a terminal) when the first scan row starts; the signal is sent then and half a
second later (an ordering, not a measurement: into the row's guest runs). A bench --quick takes
minutes on a software KVM, so a bench the signal did not end would not end within the bound either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.backends import BACKENDS
from tests.reliability.test_signals import ENV, ROOT, SIGNALS

#: A file an earlier, complete run left: a stopped bench must leave it as it was.
EARLIER = '{"earlier": "complete"}\n'


def bench_and_signal(out: Path, backend: str, signum: int) -> tuple[int, list[str]]:
    cmd = [sys.executable, "-m", "pcihole.cli", "bench", "--quick", "--backend", backend, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert "scan:" in first, f"the bench did not start its first row: {first!r}"
        time.sleep(0.5)  # ordering only: into the first row's guest runs
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, [first.rstrip("\n"), *err.splitlines()]


@pytest.mark.parametrize("signum, status, line", SIGNALS, ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_signal_ends_the_bench_with_one_line_its_status_and_no_results(
    tmp_path, backend, signum, status, line
):
    out = tmp_path / "bench-out"
    out.mkdir()
    (out / "bench.json").write_text(EARLIER)
    returncode, err = bench_and_signal(out, backend, signum)
    text = "\n".join(err)
    assert "Traceback" not in text and "Exception ignored" not in text and "error" not in text, text
    assert err[-1] == line, text
    assert all(e.startswith("pcihole bench [") for e in err[:-1]), text  # progress lines, then the one line
    assert returncode == status, text
    assert sorted(p.name for p in out.iterdir()) == ["bench.json"], (
        "a result or the staging directory was left"
    )
    assert (out / "bench.json").read_text() == EARLIER


def children(pid: int) -> list[int]:
    """The child processes of `pid`, from every thread's /proc children list."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread ended
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> list[str] | None:
    """The process's arguments, None once it is gone (reaped)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None


def booting_qemu(pid: int) -> bool:
    """A QEMU booting a guest (not the `--version` the bench asks the host description for)."""
    args = cmdline(pid) or []
    return bool(args) and Path(args[0]).name.startswith("qemu-system") and "-kernel" in args


@pytest.mark.kvm
@pytest.mark.qemu
def test_sigterm_ends_the_bench_while_qemu_runs_and_qemu_with_it(tmp_path):
    """SIGTERM sent to pcihole alone (not to its process group, as a terminal sends SIGINT) while the
    QEMU peer runs: QEMU is terminated, not waited for. The QEMU here is the real one, started paused
    (-S, through a wrapper earlier in PATH), so it would never end by itself: a bench that waited for
    it would still be there after the bound, and QEMU after the bench."""
    import shutil

    from pcihole.bench.qemu_peer import QEMU_BINARY, QEMU_TIMEOUT_SECONDS

    real = shutil.which(QEMU_BINARY)
    assert real is not None
    wrapper = tmp_path / "bin" / QEMU_BINARY
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@" -S\n')
    wrapper.chmod(0o755)
    out = tmp_path / "bench-out"
    cmd = [sys.executable, "-m", "pcihole.cli", "bench", "--quick", "--backend", "kvm", "--out", str(out)]
    env = {**ENV, "PATH": f"{wrapper.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        qemu = None
        while qemu is None and proc.poll() is None:
            qemu = next((c for c in children(proc.pid) if booting_qemu(c)), None)
            time.sleep(0.2)  # polling for QEMU's start, not a measurement
        assert qemu is not None, f"the bench ended before QEMU ran: {proc.communicate()}"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=QEMU_TIMEOUT_SECONDS / 2)
    finally:
        proc.kill()
        proc.wait()
    lines = err.splitlines()
    assert "Traceback" not in err and "error" not in err, err
    assert (proc.returncode, lines[-1]) == (143, "pcihole: terminated"), err
    assert cmdline(qemu) is None, "QEMU outlived the bench"
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []
