"""No order of close, timeout, kick or signal lets the model's Unicorn touch freed guest RAM.

The model maps guest RAM into Unicorn zero-copy, and a vCPU paused in an exit is still inside
emu_start with its translation block unfinished. Each case runs in a child process, so that a
use-after-free is a failed test (return code -11, SIGSEGV) rather than a dead test run, on every
strategy the model has. The guests store to RAM right after their exit, as the issue's reproducer
(`out` to the debug-exit port, then `add`/`pop` on a stack in .bss) does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backends import STRATEGIES_BY_BACKEND
from tests.guest_runner import KERNEL_GPA, pvh_kernel
from tests.guestasm import assemble

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, ROOT / "src")))}
MODEL_STRATEGIES = STRATEGIES_BY_BACKEND["model"]
SIGSEGV = -signal.SIGSEGV

STACK_TOP = KERNEL_GPA + 0x2000  # in the kernel's .bss (pvh_kernel's `bss`)
# The reproducer: the debug-exit `out` ends the run in the middle of a translation block
# whose next instructions touch the stack in RAM.
ENDS_MID_BLOCK = f"""
    mov ${STACK_TOP:#x}, %esp
    push %ebx
    mov $0, %al
    outb %al, $0xf4
    add $4, %esp
    pop %ebx
1:  hlt
    jmp 1b
"""
EXITS_AND_STORES = "1: out %al, $0x80\nincl 0x200000\njmp 1b"


def pcihole(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pcihole.cli", "run", "--backend", "model", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def kernel_file(tmp_path: Path, source: str, *, bss: int = 0) -> str:
    path = tmp_path / "guest.elf"
    path.write_bytes(pvh_kernel(assemble(source, org=KERNEL_GPA), bss=bss))
    return str(path)


@pytest.mark.parametrize("strategy", MODEL_STRATEGIES)
def test_a_guest_that_ends_in_the_middle_of_a_translation_block(tmp_path, strategy):
    kernel = kernel_file(tmp_path, ENDS_MID_BLOCK, bss=0x2000)
    proc = pcihole("--strategy", strategy, "--kernel", kernel)
    assert proc.returncode != SIGSEGV, "Unicorn touched freed guest RAM"
    assert proc.returncode == 0, proc.stderr


def test_a_timeout_during_the_embedded_scan():
    """--timeout 1e-4 fires while the scan runs (between exits, or in one)."""
    proc = pcihole("--timeout", "1e-4")
    assert proc.returncode != SIGSEGV, "Unicorn touched freed guest RAM"
    assert proc.returncode == 1 and "timeout" in proc.stderr, proc.stderr


@pytest.mark.parametrize("strategy", MODEL_STRATEGIES)
def test_a_timeout_while_the_guest_exits_and_stores(tmp_path, strategy):
    kernel = kernel_file(tmp_path, EXITS_AND_STORES)
    proc = pcihole("--strategy", strategy, "--kernel", kernel, "--timeout", "0.5")
    assert proc.returncode != SIGSEGV, "Unicorn touched freed guest RAM"
    assert proc.returncode == 1 and "timeout" in proc.stderr, proc.stderr


@pytest.mark.parametrize("strategy", MODEL_STRATEGIES)
def test_a_signal_while_the_guest_exits_and_stores(tmp_path, strategy):
    kernel = kernel_file(tmp_path, f"mov $0x3f8, %dx\nmov $'R', %al\nout %al, %dx\n{EXITS_AND_STORES}")
    cmd = [sys.executable, "-m", "pcihole.cli", "run", "--backend", "model", "--strategy", strategy]
    proc = subprocess.Popen(
        [*cmd, "--kernel", kernel, "--timeout", "30"],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.read(1) == "R"  # the guest runs
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != SIGSEGV, "Unicorn touched freed guest RAM"
    assert (proc.returncode, err) == (130, "pcihole: interrupted\n")


SCENARIOS = [
    "close-paused-in-out",
    "close-paused-in-in",
    "close-paused-in-mmio",
    "machine-close-paused-in-out",
    "machine-close-paused-in-unaligned-mmio",
    "memory-first-close-paused-in-unaligned-mmio",
    "kick-paused-then-close",
    "kick-paused-then-run-then-close",
    "close-while-running-in-another-thread",
]


@pytest.mark.parametrize("strategy", MODEL_STRATEGIES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_close_and_kick_in_any_order(scenario, strategy):
    """lifetime_scenarios.py: pause the vCPU in an exit (or keep it running), then close it in
    an order, with or without a kick; several free guest RAM before closing the VM."""
    cmd = [sys.executable, "-m", "tests.reliability.lifetime_scenarios", scenario, strategy]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != SIGSEGV, f"{scenario}: Unicorn touched freed guest RAM"
    assert (proc.returncode, proc.stdout.strip()) == (0, "survived"), proc.stderr
