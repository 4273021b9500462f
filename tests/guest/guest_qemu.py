"""Test harness: boot the scan guest on QEMU (q35 or microvm) with KVM, optionally under QMP."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from pcihole.guest import IMAGE_PATH
from tests.qemu_process import QEMU, QemuProcess

BASE_ARGS = ["-accel", "kvm", "-nodefaults", "-display", "none", "-no-reboot", "-m", "128"]
EXIT_DEVICE = ["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]


def _skip_reason() -> str | None:
    if QEMU is None:
        return "qemu-system-x86_64 not found"
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is missing"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible (permissions)"
    return None


SKIP_REASON = _skip_reason()
needs_qemu = [pytest.mark.qemu, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]


def run(machine: str, devices: list[str], append: str | None = None, timeout: float = 30) -> tuple[int, str]:
    """Boot with -serial stdio and isa-debug-exit; return (QEMU exit code, serial output)."""
    args = [
        QEMU,
        "-M",
        machine,
        *BASE_ARGS,
        "-serial",
        "stdio",
        "-kernel",
        str(IMAGE_PATH),
        *EXIT_DEVICE,
        *devices,
    ]
    if append is not None:
        args += ["-append", append]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout


class Session(QemuProcess):
    """QEMU started paused (-S) with QMP on a unix socket and the serial port in a file, no isa-debug-exit:
    the guest halts at the end and QEMU stays up, so the test can query it and read guest memory."""

    def __init__(self, machine: str, devices: list[str], append: str | None = None):
        args = ["-M", machine, *BASE_ARGS, "-S", "-kernel", str(IMAGE_PATH), *devices]
        if append is not None:
            args += ["-append", append]
        super().__init__(args, prefix="phq")

    def wait_done(self, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.serial()
            if "pcihole-scan: done" in text and text.endswith("\n"):
                return text
            time.sleep(0.05)
        raise TimeoutError(f"guest did not finish; serial so far: {self.serial()!r}")

    def read_phys(self, addr: int, size: int) -> bytes:
        out = self.dir / f"mem-{addr:x}.bin"
        self.qmp("pmemsave", val=addr, size=size, filename=str(out))
        return out.read_bytes()


def flatten_query_pci(buses: list[dict]) -> list[dict]:
    """Every function of a query-pci answer, bridges' children included."""
    out: list[dict] = []

    def walk(devs):
        for d in devs:
            out.append(d)
            if "pci_bridge" in d:
                walk(d["pci_bridge"].get("devices", []))

    for b in buses:
        walk(b["devices"])
    return out
