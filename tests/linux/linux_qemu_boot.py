"""Test harness: boot the fetched Debian kernel with pcihole's initramfs on QEMU TCG, with QMP.

QEMU runs with -no-shutdown, so /init's power-off stops the guest but leaves QEMU up: the test then
asks QEMU itself which functions the machine has (`query-pci`), after Linux has numbered the buses.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pcihole.linux.fetch import LinuxFetchError, fetch_busybox, fetch_kernel
from pcihole.linux.initramfs import build_initramfs

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = [
    pytest.mark.qemu,
    pytest.mark.slow,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not found"),
]


def linux_files(tmp_dir: Path) -> tuple[Path, Path]:
    """(vmlinux, initramfs file); skips the test, with the reason, where the kernel cannot be fetched."""
    try:
        vmlinux, busybox = fetch_kernel(), fetch_busybox()
    except LinuxFetchError as e:
        pytest.skip(f"the Debian kernel cannot be fetched here: {e}")
    initrd = tmp_dir / "initramfs.cpio.gz"
    initrd.write_bytes(build_initramfs(busybox))
    return vmlinux, initrd


class LinuxOnQemu:
    """`qemu-system-x86_64 -M q35 -accel tcg -kernel vmlinux -initrd ...`, QMP on a unix socket,
    serial in a file."""

    def __init__(self, vmlinux: Path, initrd: Path, append: str, devices: list[str]):
        self.dir = Path(tempfile.mkdtemp(prefix="phl"))  # short: unix socket paths are limited
        self.sock_path = self.dir / "qmp.sock"
        self.serial_path = self.dir / "serial.txt"
        args = [
            QEMU or "qemu-system-x86_64",
            "-M", "q35", "-accel", "tcg", "-m", "256",
            "-nodefaults", "-display", "none", "-no-reboot", "-no-shutdown",
            "-qmp", f"unix:{self.sock_path},server=on,wait=off",
            "-serial", f"file:{self.serial_path}",
            "-kernel", str(vmlinux), "-initrd", str(initrd), "-append", append,
            *devices,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 20
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        while True:  # the socket file appears at bind(), before QEMU listens: retry until it does
            try:
                self.sock.connect(str(self.sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.sock.close()
                    raise RuntimeError(
                        f"QEMU did not start: {self.proc.stderr.read() if self.proc.stderr else ''}"
                    ) from None
                time.sleep(0.02)
        self.f = self.sock.makefile("rw")
        assert "QMP" in json.loads(self.f.readline())
        self.qmp("qmp_capabilities")

    def qmp(self, command: str, **arguments):
        self.f.write(
            json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})}) + "\n"
        )
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def console(self) -> str:
        return self.serial_path.read_text(errors="replace") if self.serial_path.exists() else ""

    def wait_powered_off(self, timeout: float = 120) -> str:
        """The console once the guest has stopped (QMP status 'shutdown' after /init's poweroff)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.qmp("query-status")["status"] == "shutdown":
                return self.console()
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({self.proc.returncode}); console: {self.console()[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError(
            f"Linux did not power off in {timeout} s; console tail: {self.console()[-2000:]!r}"
        )

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


def query_pci_functions(buses: list[dict]) -> list[tuple[str, int, int, int, int]]:
    """(bdf, vendor, device, class, header_type) of every function `query-pci` lists, bridges'
    children included. `class` is base class << 8 | subclass: QEMU 7.2's class_info has no
    programming interface."""
    out = []

    def walk(bus_number: int, devices: list[dict]) -> None:
        for d in devices:
            cls = d["class_info"]["class"]
            header = 1 if "pci_bridge" in d else 0
            out.append((f"0000:{d['bus']:02x}:{d['slot']:02x}.{d['function']}", d["id"]["vendor"],
                        d["id"]["device"], cls, header))  # fmt: skip
            if "pci_bridge" in d:
                walk(d["pci_bridge"]["bus"]["secondary"], d["pci_bridge"].get("devices", []))

    for b in buses:
        walk(b["bus"], b["devices"])
    return sorted(out)
