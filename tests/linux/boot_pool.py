"""The suite's Linux boots, run in the background while the rest of the suite runs.

A Linux boot on kvm here takes minutes of CPU (about 5 with this project's software KVM; one on the
model, with its patched engine, seconds), nearly all of it in one process that waits on nothing but
the guest: the suite itself uses one core. So tests/linux/conftest.py starts every boot the selected
tests ask for (`linux_boot` marker) as soon as collection is done, each in a process of its own
(tests/linux/boot_child.py), as many at once as the host has cores, kvm boots first (the longest); the
tests that check them run last and each waits only for its own boot. Processes rather than threads:
the model's boots and the kvm run loop's exit handling hold the GIL, which the suite's own tests need
meanwhile, and a process can be killed: when the session ends, however it ends (Ctrl-C included),
every boot still running is.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.examples import EXAMPLES
from tests.linux.boot_child import BOOT_TIMEOUT, BootRecord

ROOT = Path(__file__).resolve().parents[2]
#: pci_apply_final_quirks() prints it once the PCI core is done (after the resource assignment and the
#: peer-bus scan): where a kvm boot stops, as user space cannot run on this host's software KVM.
PCI_DONE = "PCI: CLS "
#: How long a boot process may take beyond its guest's own timeout (building, tearing down).
GRACE_SECONDS = 300
POLL_SECONDS = 0.2
TAIL_CHARS = 3000


@dataclass(frozen=True)
class LinuxBoot:
    """The Debian kernel with pcihole's initramfs on a machine ("default" or an examples/ file's stem),
    through the library, until `until` appears on the console (None: until /init powers off)."""

    machine: str
    backend: str
    strategy: str
    until: str | None = PCI_DONE

    def __str__(self) -> str:
        return f"Linux on {self.machine} ({self.backend}/{self.strategy})"

    def argv(self, kernel: Path, initrd: Path, console: Path, result: Path) -> list[str]:
        machine = "default" if self.machine == "default" else str(EXAMPLES / f"{self.machine}.toml")
        paths = [str(p) for p in (kernel, initrd, console, result)]
        return ["machine", machine, self.backend, self.strategy, self.until or "", *paths]


@dataclass(frozen=True)
class CliBoot:
    """`pcihole ARGS...` (a `run --linux` on `backend`), for the tests of the command line itself."""

    args: tuple[str, ...]
    backend: str

    def __str__(self) -> str:
        return "pcihole " + " ".join(self.args)

    def argv(self, kernel: Path, initrd: Path, console: Path, result: Path) -> list[str]:
        return ["cli", *self.args]


Boot = LinuxBoot | CliBoot


@dataclass
class BootOutcome:
    """A finished boot process: how it exited, what it printed, and (a LinuxBoot's) the run."""

    boot: Boot
    returncode: int
    stdout: str
    stderr: str
    console: str
    record: BootRecord | None
    wall_seconds: float

    def run(self):
        """A LinuxBoot's RunResult, where the run ended as asked (its console line, or /init's
        power-off); else the test fails naming the boot, with the tails of its console and stderr."""
        from pcihole.machine.dispatch import StopReason

        if self.returncode != 0 or self.record is None:
            pytest.fail(self.tail(), pytrace=False)
        result = self.record.result
        assert isinstance(self.boot, LinuxBoot)
        # Until a console line: the line, or /init's power-off where user space ran first; else the power-off.
        asked = (
            (StopReason.POWER_OFF,)
            if self.boot.until is None
            else (StopReason.SERIAL_MATCH, StopReason.POWER_OFF)
        )
        if result.stop.reason not in asked:
            pytest.fail(f"{self.boot} stopped with {result.stop}\n{self.tail()}", pytrace=False)
        print(
            f"\n{self.boot}: stop {result.stop.reason} after {result.seconds:.0f} s of guest run, "
            f"{self.wall_seconds:.0f} s for the process, {self.record.user_seconds:.0f} s user + "
            f"{self.record.system_seconds:.0f} s system CPU; exits {result.stats.exits.as_dict()}, "
            f"ECAM exits {result.stats.ecam_exits} (absent {result.stats.ecam_absent_exits})"
        )
        return result

    def tail(self) -> str:
        """For a failure message: the boot, the end of its console and of its stderr."""
        return (
            f"{self.boot}: the boot process exited with {self.returncode} after {self.wall_seconds:.0f} s\n"
            f"--- console tail ---\n{self.console[-TAIL_CHARS:]}\n--- stderr tail ---\n{self.stderr[-TAIL_CHARS:]}"
        )


@dataclass
class _Job:
    boot: Boot
    directory: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    outcome: BootOutcome | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def path(self, name: str) -> Path:
        return self.directory / name


class BootPool:
    """Runs boots `slots` at a time, in the order given, in processes started by one thread (which lives
    until stop(): PR_SET_PDEATHSIG kills a child when the thread that forked it ends)."""

    def __init__(self, kernel: Path, initrd: Path, workdir: Path, slots: int) -> None:
        self.kernel, self.initrd, self.workdir, self.slots = kernel, initrd, workdir, slots
        self._jobs: dict[Boot, _Job] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._schedule, name="linux-boots", daemon=True)
        self._thread.start()

    def start(self, boots: list[Boot]) -> None:
        """Queue the boots not yet queued, in this order."""
        with self._lock:
            for boot in boots:
                if boot not in self._jobs:
                    directory = self.workdir / f"boot{len(self._jobs)}"
                    directory.mkdir()
                    self._jobs[boot] = _Job(boot, directory)

    def outcome(self, boot: Boot) -> BootOutcome:
        """Wait for `boot` (queued now if it was not) to finish."""
        self.start([boot])
        job = self._jobs[boot]
        if self._stopping.is_set() and job.proc is None:
            raise RuntimeError(f"{boot}: asked for after the session's boots were stopped")
        while not job.done.wait(1):
            if not self._thread.is_alive():  # a bug in the pool: fail, do not wait for ever
                raise RuntimeError(f"{boot}: the boot pool's thread ended before the boot did")
        assert job.outcome is not None
        return job.outcome

    def running(self) -> list[int]:
        """The process IDs of the boots running now."""
        with self._lock:
            jobs = list(self._jobs.values())
        return [j.proc.pid for j in jobs if j.proc is not None and not j.done.is_set()]

    def stop(self) -> None:
        """Kill every boot still running (the session is over, or interrupted) and end the thread."""
        self._stopping.set()
        self._thread.join()

    def _schedule(self) -> None:
        try:
            while not self._stopping.wait(POLL_SECONDS):
                with self._lock:
                    jobs = list(self._jobs.values())
                running = [j for j in jobs if j.proc is not None and not j.done.is_set()]
                for job in running:
                    if job.proc.poll() is not None:
                        self._finish(job)
                    elif time.monotonic() - job.started > BOOT_TIMEOUT + GRACE_SECONDS:
                        job.proc.kill()  # its guest's own timeout did not end it: a hang outside the guest
                        job.proc.wait()
                        self._finish(job)
                free = self.slots - sum(not j.done.is_set() for j in running)
                for job in [j for j in jobs if j.proc is None][: max(free, 0)]:
                    self._launch(job)
        finally:
            for job in self._jobs.values():
                if job.proc is not None and not job.done.is_set():
                    job.proc.terminate()
            for job in self._jobs.values():
                if job.proc is not None and not job.done.is_set():
                    try:
                        job.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        job.proc.kill()
                        job.proc.wait()
                    self._finish(job)
                job.done.set()  # nobody waits for ever on a job that never ran

    def _launch(self, job: _Job) -> None:
        argv = job.boot.argv(self.kernel, self.initrd, job.path("console"), job.path("result.pickle"))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
            "PCIHOLE_TEST_PARENT": str(os.getpid()),
        }
        with open(job.path("stdout"), "wb") as out, open(job.path("stderr"), "wb") as err:
            job.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.linux.boot_child", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=ROOT,
            )
        job.started = time.monotonic()

    def _finish(self, job: _Job) -> None:
        assert job.proc is not None

        def text(name: str) -> str:
            p = job.path(name)
            return p.read_bytes().decode(errors="replace") if p.exists() else ""

        record, stderr = None, text("stderr")
        result = job.path("result.pickle")
        if job.proc.returncode == 0 and result.exists():
            try:
                with open(result, "rb") as f:
                    record = pickle.load(f)
            except Exception as e:  # the test fails saying so; the thread goes on with the other boots
                stderr += f"\nboot_pool: cannot read {result}: {type(e).__name__}: {e}"
        job.outcome = BootOutcome(
            job.boot,
            job.proc.returncode,
            text("stdout"),
            stderr,
            text("console"),
            record,
            time.monotonic() - job.started,
        )
        job.done.set()
