"""What Linux's PCI core found, read from the serial console of a boot.

Two sources, best first:
- "initramfs": the block pcihole's /init prints from /sys/bus/pci/devices (initramfs.py), complete
  when its end marker's count equals the lines read;
- "kernel": the line the PCI core prints as it sets up each function (drivers/pci/probe.c
  pci_setup_device: `pci_info(dev, "[%04x:%04x] type %02x class %#08x\\n", ...)`), e.g.
  `pci 0000:00:00.0: [8086:29c0] type 00 class 0x060000`; where user space cannot run (this host's
  PVM KVM), that log is Linux's answer.

`BootClock` is a console sink that notes when /init was reached, for boot-to-/init times measured
by the host's clock on pcihole and QEMU alike.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pcihole.linux.initramfs import ECAM_BEGIN, ECAM_END, INIT_REACHED, PCI_BEGIN, PCI_END, PCI_LINE
from pcihole.pci.bdf import Bdf

# init/main.c run_init_process: pr_info("Run %s as init process\n", init_filename)
KERNEL_RUN_INIT = "Run /init as init process"
# kernel/reboot.c kernel_power_off: pr_emerg("Power down\n") with pr_fmt "reboot: "
KERNEL_POWER_DOWN = "reboot: Power down"
# kernel/panic.c panic: pr_emerg("Kernel panic - not syncing: %s\n", buf)
KERNEL_PANIC = "Kernel panic - not syncing"
# drivers/pci/quirks.c pci_apply_final_quirks (fs_initcall_sync): pr_info("PCI: CLS %u bytes, ...").
# The PCI core is done (enumeration, peer-bus scan, resource assignment) when it prints this.
KERNEL_PCI_DONE = "PCI: CLS "


def linux_stop_line(user_space_cannot_run: bool) -> str | None:
    """The console text to end a run at: where user space cannot run (a software KVM with the host
    quirks on: the first syscall faults), the end of the PCI core's work, minutes before /init;
    elsewhere none (the run ends with /init's power-off)."""
    return KERNEL_PCI_DONE if user_space_cannot_run else None


_PRINTK_TIME = re.compile(r"^\[\s*(?P<t>\d+\.\d+)\]\s?")
#: Four hex digits of domain: an MCFG segment is 16 bits (a wider domain, such as VMD's, is not pcihole's).
_BDF = r"(?P<seg>[0-9a-f]{4}):(?P<bus>[0-9a-f]{2}):(?P<dev>[0-1][0-9a-f])\.(?P<fn>[0-7])"
_KERNEL_DEVICE = re.compile(
    rf"\bpci {_BDF}: \[(?P<vendor>[0-9a-f]{{4}}):(?P<device>[0-9a-f]{{4}})\] type (?P<type>[0-9a-f]{{2}}) "
    r"class (?P<cls>0x[0-9a-f]+|0+)\b"
)
_INIT_DEVICE = re.compile(
    rf"{re.escape(PCI_LINE)}{_BDF} 0x(?P<vendor>[0-9a-f]{{4}}) 0x(?P<device>[0-9a-f]{{4}}) "
    r"0x(?P<cls>[0-9a-f]{6}) (?P<type>[0-9a-f]{2}|-)\s*$"
)
_PCI_END = re.compile(rf"{re.escape(PCI_END)} (?P<n>\d+)\s*$")
_ECAM_LINE = re.compile(r"MMCONFIG|MCFG|ECAM")


@dataclass(frozen=True)
class LinuxDevice:
    """One PCI function as Linux listed it (the fields of the scan guest's ScannedDevice that Linux prints)."""

    address: Bdf
    vendor: int
    device: int
    class_code: int  # 24 bits: base class, subclass, programming interface
    header_type: int | None  # low 7 bits; None where /init could not read config space
    multifunction: bool | None = field(default=None, compare=False)  # only the initramfs sees bit 7

    @property
    def bdf(self) -> str:
        """The address as Linux and lspci -D write it: "0000:00:01.0"."""
        return str(self.address)

    def as_json(self) -> dict[str, object]:
        """The keys of `pcihole run --json`'s "devices"."""
        return {
            "bdf": self.bdf,
            "vendor": f"{self.vendor:#06x}",
            "device": f"{self.device:#06x}",
            "class": f"{self.class_code:#08x}",
            "header_type": self.header_type,
        }


@dataclass
class LinuxReport:
    devices: list[LinuxDevice]
    source: str  # "initramfs" | "kernel" | "none"
    reached_init: bool
    mcfg_lines: list[str]
    powered_off: bool
    #: The kernel's own timestamp (seconds since its start) of "Run /init as init process".
    init_kernel_seconds: float | None = None
    #: The panic line, if the kernel panicked.
    panic: str | None = None
    #: The kernel's enumeration lines, whatever the source (to compare with the initramfs's list).
    kernel_devices: list[LinuxDevice] = field(default_factory=list)


def _device(m: re.Match[str], raw_header: bool) -> LinuxDevice:
    """`raw_header`: the type field is config byte 14 as read (/init), not the kernel's hdr_type,
    which drops bit 7 (multi-function)."""
    ht = m["type"]
    raw = None if ht == "-" else int(ht, 16)
    return LinuxDevice(
        address=Bdf(int(m["seg"], 16), int(m["bus"], 16), int(m["dev"], 16), int(m["fn"])),
        vendor=int(m["vendor"], 16),
        device=int(m["device"], 16),
        class_code=int(m["cls"], 16),
        header_type=None if raw is None else raw & 0x7F,
        multifunction=None if raw is None or not raw_header else bool(raw & 0x80),
    )


def _sorted(devices: dict[Bdf, LinuxDevice]) -> list[LinuxDevice]:
    return [devices[k] for k in sorted(devices)]


def parse_linux_console(text: str) -> LinuxReport:
    """Read a boot's serial console (kernel messages and /init's block) into a LinuxReport."""
    lines = text.replace("\r", "").split("\n")
    kernel: dict[Bdf, LinuxDevice] = {}
    block: dict[Bdf, LinuxDevice] = {}
    in_block = block_done = False
    in_ecam = False
    block_count: int | None = None
    ecam_block: list[str] = []
    kernel_ecam: list[str] = []
    reached_init = powered_off = False
    init_seconds: float | None = None
    panic: str | None = None
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line == INIT_REACHED:
            reached_init = True
        elif line == PCI_BEGIN:
            in_block, block_done, block = True, False, {}
        elif in_block and (m := _PCI_END.search(line)):
            in_block, block_done, block_count = False, True, int(m["n"])
        elif line == ECAM_BEGIN:
            in_ecam, ecam_block = True, []
        elif line == ECAM_END:
            in_ecam = False
        elif in_block and (m := _INIT_DEVICE.search(line)):
            d = _device(m, raw_header=True)
            block[d.address] = d
            continue
        if in_ecam and line != ECAM_BEGIN:
            ecam_block.append(line)
            continue
        if m := _KERNEL_DEVICE.search(line):
            d = _device(m, raw_header=False)
            kernel[d.address] = d  # a rescan prints a function again: keep the last
        elif KERNEL_RUN_INIT in line:
            reached_init = True
            if t := _PRINTK_TIME.match(line):
                init_seconds = float(t["t"])
        elif KERNEL_POWER_DOWN in line:
            powered_off = True
        elif KERNEL_PANIC in line and panic is None:
            panic = line[line.index(KERNEL_PANIC) :]
        elif _ECAM_LINE.search(line) and not line.startswith(PCI_LINE):
            kernel_ecam.append(line)
    initramfs_ok = block_done and block_count == len(block)
    if initramfs_ok:
        devices, source = _sorted(block), "initramfs"
    elif kernel:
        devices, source = _sorted(kernel), "kernel"
    else:
        devices, source = [], "none"
    return LinuxReport(
        devices=devices,
        source=source,
        reached_init=reached_init,
        mcfg_lines=ecam_block if ecam_block else kernel_ecam,
        powered_off=powered_off,
        init_kernel_seconds=init_seconds,
        panic=panic,
        kernel_devices=_sorted(kernel),
    )


class BootClock:
    """A console sink (bytes in) that keeps the text and notes, by `clock`, when /init was reached
    (the kernel's "Run /init as init process" line, or /init's own first line)."""

    def __init__(
        self, forward: Callable[[bytes], None] | None = None, clock: Callable[[], float] = time.perf_counter
    ):
        self.clock = clock
        self.start = clock()
        self.init_at: float | None = None
        self._forward = forward
        self._buf = bytearray()
        self._line = bytearray()

    def __call__(self, data: bytes) -> None:
        self._buf += data
        if self._forward is not None:
            self._forward(data)
        if self.init_at is not None:
            return
        for byte in data:
            if byte != 0x0A:
                self._line.append(byte)
                continue
            line = self._line.decode(errors="replace")
            self._line.clear()
            if KERNEL_RUN_INIT in line or line.strip() == INIT_REACHED:
                self.init_at = self.clock()
                return

    def restart(self) -> None:
        """Count from now (call just before the guest starts)."""
        self.start = self.clock()

    @property
    def boot_seconds(self) -> float | None:
        """Seconds from the start to /init, or None if /init was not reached."""
        return None if self.init_at is None else self.init_at - self.start

    def text(self) -> str:
        return self._buf.decode(errors="replace")
