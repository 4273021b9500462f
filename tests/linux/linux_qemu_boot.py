"""Test harness: boot the fetched Debian kernel with pcihole's initramfs on QEMU TCG, with QMP.

QEMU runs with -no-shutdown, so /init's power-off stops the guest but leaves QEMU up: the test then
asks QEMU itself which functions the machine has (`query-pci`), after Linux has numbered the buses.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pcihole.linux.fetch import LinuxFetchError, fetch_busybox, fetch_kernel
from pcihole.linux.initramfs import build_initramfs
from tests.qemu_process import QEMU, QemuProcess

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


class LinuxOnQemu(QemuProcess):
    """`qemu-system-x86_64 -M q35 -accel tcg -kernel vmlinux -initrd ...`, QMP on a unix socket,
    serial in a file."""

    def __init__(self, vmlinux: Path, initrd: Path, append: str, devices: list[str]):
        super().__init__(
            [
                "-M", "q35", "-accel", "tcg", "-m", "256",
                "-nodefaults", "-display", "none", "-no-reboot", "-no-shutdown",
                "-kernel", str(vmlinux), "-initrd", str(initrd), "-append", append,
                *devices,
            ],
            prefix="phl",
        )  # fmt: skip

    def console(self) -> str:
        return self.serial()

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
