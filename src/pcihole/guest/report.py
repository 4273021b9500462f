"""Parsers for what the scan guest reports: the ``pcihole_report`` struct in guest memory and its serial lines.

Layout (little-endian, version 2; README.md in this folder is the reference)::

    0x00 u32 magic "PHSR" (0x52534850)   0x04 u16 version (2)     0x06 u16 header_size (0x38)
    0x08 u32 max_regions (4096)           0x0c u32 max_devices (256, or pcihole.devices=ADDR,MAX)
    0x10 u32 state (0 not started, 1 running, 2 done)             0x14 u32 status (bits below)
    0x18 u32 scans                        0x1c u32 config_reads (last scan)
    0x20 u32 total_config_reads           0x24 u32 ndevices (last scan; may exceed max_devices)
    0x28 u32 nregions                     0x2c u32 rsdp_paddr      0x30 u32 mcfg_paddr
    0x34 u32 devices_paddr
    header_size:    regions[max_regions], 16 bytes: u64 base, u16 segment, u8 start_bus, u8 end_bus,
                                                    u8 source (1 mcfg, 2 cmdline), u8 flags (1 skipped), u16 0
    devices_paddr:  devices[max_devices], 16 bytes: u16 segment, u8 bus, u8 devfn, u16 vendor, u16 device,
                                                    u32 class_rev, u8 header_type (raw), u8 flags,
                                                    u8 secondary, u8 subordinate

The device list is wherever the guest says (its own .bss, or the area the VMM gave it with
``pcihole.devices=ADDR,MAX``, sized from the machine): everything in the report is written by the
guest, so a reader that knows the area it gave passes it (`DeviceArea`) and anything else is a
ReportError, never a read outside it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag

from pcihole.boot.elf import ElfImage
from pcihole.pci.bdf import Bdf

from . import REPORT_SYMBOL

REPORT_MAGIC = 0x52534850  # b"PHSR"
REPORT_VERSION = 2
#: The option that places the device list (scan.c parse_devices).
DEVICES_OPTION = "pcihole.devices"
#: Entries of the device list in the guest's own .bss, when no DEVICES_OPTION is given.
DEFAULT_MAX_DEVICES = 256
TIMING_SYMBOL = "pcihole_timing"
TIMING_MAGIC = 0x4D544850  # b"PHTM"
TIMING_VERSION = 1
#: struct timing: u32 magic, u32 version, u64 scan_tsc (beside the report, which keeps its layout)
TIMING = struct.Struct("<IIQ")
HEADER = struct.Struct("<IHHIIIIIIIIIIII")
REGION = struct.Struct("<QHBBBBH")
DEVICE = struct.Struct("<HBBHHIBBBB")

STATE_NOT_STARTED = 0
STATE_RUNNING = 1
STATE_DONE = 2


class ScanStatus(IntFlag):
    """What went wrong in the scan guest: its status bits (scan.c ST_*); the low byte is also the
    value written to port 0xf4."""

    NO_ECAM = 0x01
    BAD_START_INFO = 0x02
    NO_ACPI = 0x04
    NO_MCFG = 0x08
    BAD_TABLE = 0x10
    REGION_SKIPPED = 0x20
    BAD_OPTION = 0x40
    TRUNCATED = 0x80

    @property
    def label(self) -> str:
        """As the CLI prints it: "no-ecam", "bad-start-info", ..."""
        return (self.name or "").lower().replace("_", "-")


SOURCE_MCFG = 1
SOURCE_CMDLINE = 2
SOURCE_NAMES = {SOURCE_MCFG: "mcfg", SOURCE_CMDLINE: "cmdline"}
REGION_SKIPPED = 0x01

DEV_PEER_SCAN = 0x01
DEV_ONE_CHILD = 0x02
DEV_NOT_FOLLOWED = 0x04

LINE_PREFIX = "pcihole-scan: "


class ReportError(ValueError):
    pass


@dataclass(frozen=True)
class DeviceArea:
    """Where a VMM told the guest to put its device list, and how many entries it holds."""

    paddr: int
    max_devices: int

    @property
    def size(self) -> int:
        return self.max_devices * DEVICE.size

    def option(self) -> str:
        return f"{DEVICES_OPTION}={self.paddr:#x},{self.max_devices}"


def status_names(status: int) -> list[str]:
    return [bit.label for bit in ScanStatus if status & bit]


@dataclass(frozen=True)
class EcamRegion:
    base: int
    segment: int
    start_bus: int
    end_bus: int
    source: str  # "mcfg" | "cmdline"
    skipped: bool = False


@dataclass(frozen=True)
class ScannedDevice:
    address: Bdf
    vendor: int
    device: int
    class_code: int  # 24 bits: base class, subclass, programming interface
    revision: int
    header_type: int  # low 7 bits
    multifunction: bool
    # Only in the memory report (the serial line does not carry them):
    flags: int = field(default=0, compare=False)
    secondary: int = field(default=0, compare=False)
    subordinate: int = field(default=0, compare=False)

    @property
    def bdf(self) -> str:
        """The address as lspci -D writes it: "0000:00:01.0"."""
        return str(self.address)

    @property
    def header_byte(self) -> int:
        return self.header_type | (0x80 if self.multifunction else 0)

    def key(self) -> tuple[str, int, int, int]:
        """What another enumerator (QEMU's query-pci, lspci) can be compared on."""
        return (self.bdf, self.vendor, self.device, self.class_code)

    def line(self) -> str:
        """The serial line the guest prints for this device."""
        return (
            f"{LINE_PREFIX}{self.bdf} {self.vendor:04x}:{self.device:04x} class {self.class_code:06x}"
            f" rev {self.revision:02x} hdr {self.header_byte:02x}"
        )


@dataclass
class ScanReport:
    """The in-memory report."""

    version: int
    state: int
    status: int
    scans: int
    config_reads: int
    total_config_reads: int
    ndevices: int
    rsdp_paddr: int
    mcfg_paddr: int
    regions: list[EcamRegion]
    devices: list[ScannedDevice]

    @property
    def done(self) -> bool:
        return self.state == STATE_DONE

    @property
    def truncated(self) -> bool:
        return self.ndevices > len(self.devices)


@dataclass(frozen=True)
class ExitLoop:
    """The ``exitloop`` line (option ``pcihole.exitloop=N``): TSC ticks of N 4-byte reads of offset 0
    of the first absent function the scan found, of the first present one (the host bridge 00:00.0)
    and of a RAM word. An address of 0 means the scan found no such function (its ticks are 0)."""

    reads: int
    absent_addr: int
    absent_tsc: int
    present_addr: int
    present_tsc: int
    ram_tsc: int

    def absent_ticks_per_read(self) -> float | None:
        """(absent ticks - RAM ticks) / N: one read of an absent function, the guest's loop taken out."""
        return (self.absent_tsc - self.ram_tsc) / self.reads if self.absent_addr else None

    def present_ticks_per_read(self) -> float | None:
        return (self.present_tsc - self.ram_tsc) / self.reads if self.present_addr else None


@dataclass
class SerialReport:
    """What the serial lines say. ``done`` is False when the final line has not (yet) been seen."""

    regions: list[EcamRegion] = field(default_factory=list)
    devices: list[ScannedDevice] = field(default_factory=list)
    done: bool = False
    ndevices: int = 0
    config_reads: int = 0
    status: int = 0
    scans: int = 0
    #: TSC ticks the scans took, from the done line (only with the pcihole.timing option)
    scan_tsc: int | None = None
    #: the exitloop line (only with the pcihole.exitloop=N option)
    exit_loop: ExitLoop | None = None


# ---------------------------------------------------------------------------- memory report


def report_symbol(image: bytes | ElfImage) -> tuple[int, int]:
    """(guest physical address, size) of ``pcihole_report`` in the image (physical == virtual)."""
    elf = image if isinstance(image, ElfImage) else ElfImage(image)
    sym = elf.symbol(REPORT_SYMBOL)
    return sym.value, sym.size


def check_symbols(image: ElfImage, ram_size: int) -> None:
    """ReportError, naming the image, if ``pcihole_report`` or ``pcihole_timing`` (where the image
    has them) is not inside the guest's RAM: found when the kernel is loaded, not after the run."""
    symbols = image.symbols()
    for name, least in ((REPORT_SYMBOL, HEADER.size), (TIMING_SYMBOL, TIMING.size)):
        sym = symbols.get(name)
        if sym is None:
            continue
        size = max(sym.size, least)
        if sym.value + size > ram_size:
            raise ReportError(
                f"{image.name}: symbol {name} [{sym.value:#x}, {sym.value + size - 1:#x}] is outside the "
                f"guest's RAM (the first {ram_size >> 20} MiB)"
            )


def parse_report(
    data: bytes, read_phys: Callable[[int, int], bytes], area: DeviceArea | None = None
) -> ScanReport:
    """Parse the bytes of ``pcihole_report`` (at least the header and the regions in use); the device
    list is read with ``read_phys(gpa, size)`` from where the report says. With `area`, the list
    must be inside it (a guest cannot make the reader read elsewhere or more)."""
    if len(data) < HEADER.size:
        raise ReportError(f"report too short ({len(data)} bytes)")
    (
        magic,
        version,
        header_size,
        max_regions,
        max_devices,
        state,
        status,
        scans,
        config_reads,
        total_reads,
        ndevices,
        nregions,
        rsdp,
        mcfg,
        devices_paddr,
    ) = HEADER.unpack_from(data, 0)
    if magic != REPORT_MAGIC:
        if magic == 0 and state == 0:
            raise ReportError("report is empty: the guest has not started")
        raise ReportError(f"bad report magic {magic:#010x}")
    if version != REPORT_VERSION:
        raise ReportError(f"unsupported report version {version}")
    if nregions > max_regions:
        raise ReportError(f"nregions {nregions} > max_regions {max_regions}")
    if len(data) < header_size + nregions * REGION.size:
        raise ReportError(f"report truncated: {len(data)} bytes, need {header_size + nregions * REGION.size}")
    nstored = min(ndevices, max_devices)
    if area is not None and (devices_paddr != area.paddr or max_devices > area.max_devices):
        raise ReportError(
            f"the device list is at {devices_paddr:#x} with {max_devices} entries, not in the area given "
            f"to the guest ({area.paddr:#x}, {area.max_devices} entries)"
        )
    try:
        device_bytes = read_phys(devices_paddr, nstored * DEVICE.size) if nstored else b""
    except (ValueError, OSError) as e:
        raise ReportError(f"cannot read the device list at {devices_paddr:#x}: {e}") from None
    if len(device_bytes) < nstored * DEVICE.size:
        raise ReportError(f"device list truncated: {len(device_bytes)} bytes, need {nstored * DEVICE.size}")
    regions = []
    for i in range(nregions):
        base, seg, start, end, source, flags, _ = REGION.unpack_from(data, header_size + i * REGION.size)
        regions.append(
            EcamRegion(
                base, seg, start, end, SOURCE_NAMES.get(source, str(source)), bool(flags & REGION_SKIPPED)
            )
        )
    devices = []
    for i in range(nstored):
        seg, bus, devfn, ven, dev, class_rev, hdr, flags, sec, sub = DEVICE.unpack_from(
            device_bytes, i * DEVICE.size
        )
        devices.append(
            ScannedDevice(
                Bdf.from_devfn(seg, bus, devfn),
                ven,
                dev,
                class_rev >> 8,
                class_rev & 0xFF,
                hdr & 0x7F,
                bool(hdr & 0x80),
                flags,
                sec,
                sub,
            )
        )
    return ScanReport(
        version, state, status, scans, config_reads, total_reads, ndevices, rsdp, mcfg, regions, devices
    )


def read_report(
    image: bytes | ElfImage, read_phys: Callable[[int, int], bytes], area: DeviceArea | None = None
) -> ScanReport:
    """Find ``pcihole_report`` in the image and parse it from guest memory (``read_phys(gpa, size)``);
    `area` as in parse_report."""
    addr, size = report_symbol(image)
    try:
        data = read_phys(addr, size)
    except (ValueError, OSError) as e:
        raise ReportError(f"cannot read the report at {addr:#x}: {e}") from None
    return parse_report(data, read_phys, area)


def read_scan_tsc(image: bytes | ElfImage, read_phys: Callable[[int, int], bytes]) -> int | None:
    """TSC ticks the guest's scans took, from ``pcihole_timing`` in guest memory.

    None for an image without the symbol (built before it existed) or a guest that has not
    finished its scans (no magic yet)."""
    elf = image if isinstance(image, ElfImage) else ElfImage(image)
    if TIMING_SYMBOL not in elf.symbols():
        return None
    sym = elf.symbol(TIMING_SYMBOL)
    magic, version, scan_tsc = TIMING.unpack(read_phys(sym.value, TIMING.size))
    if magic != TIMING_MAGIC or version != TIMING_VERSION:
        return None
    return scan_tsc


# ---------------------------------------------------------------------------- serial lines

_HEX = "[0-9a-f]"
_DEVICE_RE = re.compile(
    rf"({_HEX}{{4}}):({_HEX}{{2}}):({_HEX}{{2}})\.([0-7]) ({_HEX}{{4}}):({_HEX}{{4}})"
    rf" class ({_HEX}{{6}}) rev ({_HEX}{{2}}) hdr ({_HEX}{{2}})"
)
_REGION_RE = re.compile(
    rf"ecam ({_HEX}{{4}}) base=0x({_HEX}{{16}}) buses=({_HEX}{{2}})-({_HEX}{{2}}) source=(mcfg|cmdline)( skipped)?"
)
_EXITLOOP_RE = re.compile(
    rf"exitloop reads=(\d+) absent=0x({_HEX}{{8}}) absent_tsc=0x({_HEX}{{16}}) present=0x({_HEX}{{8}})"
    rf" present_tsc=0x({_HEX}{{16}}) ram_tsc=0x({_HEX}{{16}})"
)
_DONE_RE = re.compile(
    r"done devices=(\d+) config_reads=(\d+) status=0x([0-9a-f]{2,8}) scans=(\d+)(?: scan_tsc=0x([0-9a-f]{16}))?"
)


def parse_serial(text: str) -> SerialReport:
    """Parse the guest's serial output; lines without the ``pcihole-scan: `` prefix are ignored."""
    rep = SerialReport()
    for raw in text.splitlines():
        line = raw.strip("\r")
        if not line.startswith(LINE_PREFIX):
            continue
        body = line[len(LINE_PREFIX) :]
        if m := _DEVICE_RE.fullmatch(body):
            seg, bus, slot, fn, ven, dev, cls, rev, hdr = m.groups()
            h = int(hdr, 16)
            try:
                address = Bdf(int(seg, 16), int(bus, 16), int(slot, 16), int(fn))
            except ValueError as e:  # a device number above 31
                raise ReportError(f"unparseable guest line: {line!r}: {e}") from None
            rep.devices.append(
                ScannedDevice(
                    address,
                    int(ven, 16),
                    int(dev, 16),
                    int(cls, 16),
                    int(rev, 16),
                    h & 0x7F,
                    bool(h & 0x80),
                )
            )
        elif m := _REGION_RE.fullmatch(body):
            seg, base, start, end, source, skipped = m.groups()
            rep.regions.append(
                EcamRegion(int(base, 16), int(seg, 16), int(start, 16), int(end, 16), source, bool(skipped))
            )
        elif m := _EXITLOOP_RE.fullmatch(body):
            reads, absent, absent_tsc, present, present_tsc, ram_tsc = m.groups()
            rep.exit_loop = ExitLoop(
                int(reads),
                int(absent, 16),
                int(absent_tsc, 16),
                int(present, 16),
                int(present_tsc, 16),
                int(ram_tsc, 16),
            )
        elif m := _DONE_RE.fullmatch(body):
            rep.done = True
            rep.ndevices, rep.config_reads = int(m[1]), int(m[2])
            rep.status, rep.scans = int(m[3], 16), int(m[4])
            rep.scan_tsc = int(m[5], 16) if m[5] is not None else None
        else:
            raise ReportError(f"unparseable guest line: {line!r}")
    return rep
