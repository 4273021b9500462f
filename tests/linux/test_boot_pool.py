"""The suite's background Linux boots (tests/linux/boot_pool.py): a boot's process gives back what it
printed; and no boot outlives the suite, whether the pool is stopped, the suite is interrupted with
Ctrl-C (SIGINT to pytest) or killed outright (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pcihole.linux.fetch import LinuxFetchError, fetch_busybox, fetch_kernel
from pcihole.linux.initramfs import build_initramfs
from pcihole.machine.dispatch import StopReason
from tests.linux.boot_pool import ROOT, BootPool, CliBoot, LinuxBoot

#: A boot long enough to be caught running (the model, five segments, to /init's power-off: tens of
#: seconds on the patched engine); the tests below check it was killed, not that it had ended.
LONG_BOOT = LinuxBoot("many-segments", "model", "native", until=None)
SCAN = CliBoot(("run", "--backend", "model", "--strategy", "native", "--json"), "model")
WAIT_SECONDS = 60


@pytest.fixture(scope="module")
def kernel_and_initrd(tmp_path_factory):
    try:
        kernel, busybox = fetch_kernel(), fetch_busybox()
    except LinuxFetchError as e:
        pytest.skip(f"cannot fetch the Debian cloud kernel: {e}")
    initrd = tmp_path_factory.mktemp("initrd") / "initramfs.cpio"
    initrd.write_bytes(build_initramfs(busybox))
    return kernel, initrd


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {WAIT_SECONDS} s"
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def test_a_boot_gives_back_what_its_process_printed(tmp_path, kernel_and_initrd):
    pool = BootPool(*kernel_and_initrd, tmp_path, slots=1)
    try:
        outcome = pool.outcome(SCAN)
    finally:
        pool.stop()
    assert outcome.returncode == 0, outcome.tail()
    data = json.loads(outcome.stdout)
    assert (data["backend"], data["strategy"]) == ("model", "native")
    assert data["devices"]
    assert str(SCAN) in outcome.tail()


def test_a_library_boot_gives_back_its_run(tmp_path, kernel_and_initrd):
    """The run comes back through the pickle the boot's process wrote, up to the line asked for."""
    boot = LinuxBoot("default", "model", "native", until="Linux version")
    pool = BootPool(*kernel_and_initrd, tmp_path, slots=1)
    try:
        outcome = pool.outcome(boot)
    finally:
        pool.stop()
    result = outcome.run()
    assert result.stop.reason == StopReason.SERIAL_MATCH, outcome.tail()
    assert "Linux version" in result.serial and "Linux version" in outcome.console
    assert outcome.record.user_seconds > 0


def test_stopping_the_pool_kills_the_boots_running_and_starts_no_more(tmp_path, kernel_and_initrd):
    pool = BootPool(*kernel_and_initrd, tmp_path, slots=1)
    try:
        pool.start([LONG_BOOT, SCAN])  # one slot: the scan waits behind the long boot
        wait_for(pool.running, "boot process")
        [pid] = pool.running()
    finally:
        pool.stop()
    assert not alive(pid)
    outcome = pool.outcome(LONG_BOOT)
    assert outcome.returncode == -signal.SIGTERM, outcome.tail()
    assert outcome.record is None
    with pytest.raises(RuntimeError, match="stopped"):
        pool.outcome(SCAN)


POOL_OWNER = """
import sys, time
from pathlib import Path
from tests.linux.boot_pool import BootPool, LinuxBoot
pool = BootPool(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), slots=1)
pool.start([LinuxBoot("many-segments", "model", "native", until=None)])
while not pool.running():
    time.sleep(0.1)
print(pool.running()[0], flush=True)
time.sleep(600)
"""


def test_a_boot_dies_with_the_process_that_started_it(tmp_path, kernel_and_initrd):
    kernel, initrd = kernel_and_initrd
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(POOL_OWNER), str(kernel), str(initrd), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        pid = int(owner.stdout.readline())
        assert alive(pid)
    finally:
        owner.kill()
        owner.wait()
    wait_for(lambda: not alive(pid), "end of the orphaned boot")
    # Killed, not finished: a boot that ends on its own pickles its run first (boot_child.boot_machine).
    assert not (tmp_path / "boot0" / "result.pickle").exists()


@pytest.mark.slow
def test_ctrl_c_during_the_suite_leaves_no_boot_running(tmp_path, kernel_and_initrd):
    """pytest gets SIGINT while a test waits for its boot: the session ends and the boot's process
    with it."""
    suite = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/linux/test_linux_boot.py::test_linux_on_the_model_lists_every_segment_from_init_with_no_absent_exit",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        wait_for(lambda: children(suite.pid), "boot process under pytest")
        [pid] = children(suite.pid)
        suite.send_signal(signal.SIGINT)
        out, _ = suite.communicate(timeout=WAIT_SECONDS)
    finally:
        suite.kill()
        suite.wait()
    assert "KeyboardInterrupt" in out, out
    assert not alive(pid)
