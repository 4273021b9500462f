"""Test harness: boot the scan guest on QEMU (q35 or microvm) with KVM, optionally under QMP."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pcihole.guest import IMAGE_PATH

QEMU = shutil.which("qemu-system-x86_64")
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


class Session:
    """QEMU started paused (-S) with QMP on a unix socket and the serial port in a file, no isa-debug-exit:
    the guest halts at the end and QEMU stays up, so the test can query it and read guest memory."""

    def __init__(self, machine: str, devices: list[str], append: str | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="phq"))  # short: unix socket paths are limited to 108 bytes
        self.sock_path = self.dir / "qmp.sock"
        self.serial_path = self.dir / "serial.txt"
        args = [
            QEMU,
            "-M",
            machine,
            *BASE_ARGS,
            "-S",
            "-qmp",
            f"unix:{self.sock_path},server=on,wait=off",
            "-serial",
            f"file:{self.serial_path}",
            "-kernel",
            str(IMAGE_PATH),
            *devices,
        ]
        if append is not None:
            args += ["-append", append]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        # QEMU creates the socket file before it listens on it: retry a refused connect until it
        # listens (a connect as soon as the file exists was refused now and then on a loaded machine).
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(
                    f"QEMU did not start: {self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(20)
            try:
                self.sock.connect(str(self.sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                time.sleep(0.02)
        self.f = self.sock.makefile("rw")
        greeting = json.loads(self.f.readline())
        assert "QMP" in greeting
        self.qmp("qmp_capabilities")

    def qmp(self, command: str, **arguments):
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def serial(self) -> str:
        return self.serial_path.read_text(errors="replace") if self.serial_path.exists() else ""

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

    def close(self):
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            self.qmp("quit")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
