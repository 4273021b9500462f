"""Test harness: run the scan guest on Unicorn with synthetic ACPI tables and a synthetic ECAM.

Independent of the VMM: it loads the ELF itself, builds hvm_start_info, RSDP/XSDT/RSDT/MCFG, and serves
ECAM reads from a Python dictionary of config spaces (absent functions read as all-ones), counting every
access by size. OUT instructions go to ``serial`` (0x3f8) and ``exit_code`` (0xf4, which stops the run).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

import unicorn
from unicorn import x86_const

from pcihole.boot.elf import ElfImage
from pcihole.boot.pvh import pvh_entry
from pcihole.guest import image_bytes
from pcihole.guest.report import ScanReport, parse_report, report_symbol

RAM_SIZE = 16 << 20
START_INFO = 0x5000
CMDLINE = 0x6000
TABLES = 0x80000  # XSDT, RSDT, MCFG, ... (each 256-byte aligned)
HVM_START_MAGIC = 0x336EC578


def _checksum_fix(b: bytearray, at: int) -> bytearray:
    b[at] = (-sum(b)) & 0xFF
    return b


def sdt(sig: bytes, body: bytes, revision: int = 1) -> bytearray:
    """An ACPI table with a correct header checksum."""
    length = 36 + len(body)
    hdr = struct.pack("<4sIBB6s8sI4sI", sig, length, revision, 0, b"PCIHOL", b"TESTTBL ", 1, b"TEST", 1)
    return _checksum_fix(bytearray(hdr + body), 9)


def mcfg(entries: list[tuple[int, int, int, int]]) -> bytearray:
    """MCFG with (base, segment, start_bus, end_bus) allocations."""
    body = bytes(8) + b"".join(struct.pack("<QHBBI", b, s, st, en, 0) for b, s, st, en in entries)
    return sdt(b"MCFG", body)


def rsdp(revision: int, rsdt: int, xsdt: int) -> bytearray:
    b = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, b"PCIHOL", revision, rsdt))
    _checksum_fix(b, 8)
    if revision >= 2:
        b += struct.pack("<IQB3s", 36, xsdt, 0, b"\0\0\0")
        _checksum_fix(b, 32)
    return b


class Function:
    """One function's 4 KiB of config space."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0, header_type: int = 0):
        self.cfg = bytearray(4096)
        struct.pack_into("<HH", self.cfg, 0, vendor, device)
        struct.pack_into("<I", self.cfg, 8, class_code << 8 | revision)
        self.cfg[0x0E] = header_type

    def caps(self, caps: list[tuple[int, int, bytes]]) -> Function:
        """Capability list: (offset, id, payload after the id/next bytes)."""
        self.cfg[0x06] |= 0x10
        self.cfg[0x34] = caps[0][0] if caps else 0
        for i, (off, cid, payload) in enumerate(caps):
            nxt = caps[i + 1][0] if i + 1 < len(caps) else 0
            self.cfg[off] = cid
            self.cfg[off + 1] = nxt
            self.cfg[off + 2 : off + 2 + len(payload)] = payload
        return self


def endpoint(vendor=0x1AF4, device=0x1041, class_code=0x020000, revision=1, multifunction=False) -> Function:
    return Function(vendor, device, class_code, revision, 0x80 if multifunction else 0)


def bridge(
    secondary: int, subordinate: int, pcie_type: int | None = None, primary: int = 0, extra_caps: bool = True
) -> Function:
    """A type-1 header; with ``pcie_type`` a PCI Express capability (port type in bits 7:4), after a PM cap."""
    f = Function(0x1B36, 0x000C, 0x060400, 0, 0x01)
    struct.pack_into("<BBB", f.cfg, 0x18, primary, secondary, subordinate)
    if pcie_type is not None:
        exp = (0x10, struct.pack("<H", 2 | pcie_type << 4))
        f.caps(([(0x40, 0x01, b"\x03\x00")] if extra_caps else []) + [(0x60 if extra_caps else 0x40, *exp)])
    return f


@dataclass
class Machine:
    # (segment, bus, devfn) -> Function
    functions: dict[tuple[int, int, int], Function] = field(default_factory=dict)
    # ECAM windows: (base, segment, start_bus, end_bus); what MCFG says unless mcfg_entries is given
    ecam: list[tuple[int, int, int, int]] = field(default_factory=lambda: [(0xB0000000, 0, 0, 255)])
    mcfg_entries: list[tuple[int, int, int, int]] | None = None
    with_mcfg: bool = True
    with_acpi: bool = True
    rsdp_revision: int = 2
    rsdp_at: int = 0xF0010  # inside 0xE0000-0xFFFFF: found by the scan too
    rsdp_hint: bool = True  # pass rsdp_paddr in hvm_start_info
    corrupt: str = ""  # "", "mcfg", "xsdt", "rsdp"
    cmdline: str = ""
    start_info_magic: int = HVM_START_MAGIC

    def add(self, bus: int, dev: int, fn: int, f: Function, segment: int = 0) -> Function:
        self.functions[(segment, bus, dev << 3 | fn)] = f
        return f


@dataclass
class Result:
    serial: str
    exit_code: int | None
    reads: Counter  # access size -> count
    writes: list
    report: ScanReport
    read_log: list  # (segment, bus, devfn, reg, size) in order


def run(m: Machine, image: bytes | None = None, max_insns: int = 50_000_000) -> Result:
    image = image or image_bytes()
    elf = ElfImage(image)
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, RAM_SIZE)
    for paddr, data, memsz in elf.load_segments():
        # Dirty the bss first: the guest must zero it itself.
        uc.mem_write(paddr, data + b"\xa5" * (memsz - len(data)))

    # ACPI
    if m.with_acpi:
        tables: list[bytes] = []
        if m.with_mcfg:
            t = mcfg(m.mcfg_entries if m.mcfg_entries is not None else m.ecam)
            if m.corrupt == "mcfg":
                t[9] ^= 1
            tables.append(bytes(t))
        tables.append(bytes(sdt(b"APIC", bytes(8))))
        addrs = []
        for i, t in enumerate(tables):
            a = TABLES + (i + 2) * 0x100
            uc.mem_write(a, t)
            addrs.append(a)
        xsdt = sdt(b"XSDT", b"".join(struct.pack("<Q", a) for a in addrs))
        rsdt = sdt(b"RSDT", b"".join(struct.pack("<I", a) for a in addrs))
        if m.corrupt == "xsdt":
            xsdt[9] ^= 1
        uc.mem_write(TABLES, bytes(xsdt))
        uc.mem_write(TABLES + 0x100, bytes(rsdt))
        r = rsdp(m.rsdp_revision, TABLES + 0x100, TABLES)
        if m.corrupt == "rsdp":
            r[8] ^= 1
        uc.mem_write(m.rsdp_at, bytes(r))

    # hvm_start_info
    uc.mem_write(CMDLINE, m.cmdline.encode() + b"\0")
    si = struct.pack(
        "<IIIIQQQQI",
        m.start_info_magic,
        1,
        0,
        0,
        0,
        CMDLINE if m.cmdline else 0,
        m.rsdp_at if (m.rsdp_hint and m.with_acpi) else 0,
        0,
        0,
    )
    uc.mem_write(START_INFO, si)

    # ECAM
    reads: Counter = Counter()
    writes: list = []
    read_log: list = []
    for base, seg, start, end in m.ecam:
        lo = base + (start << 20)

        def on_read(uc_, off, size, _ud, seg=seg, lo=lo, start=start):
            addr = off
            bus, devfn, reg = start + (addr >> 20), (addr >> 12) & 0xFF, addr & 0xFFF
            reads[size] += 1
            read_log.append((seg, bus, devfn, reg, size))
            f = m.functions.get((seg, bus, devfn))
            if f is None:
                return (1 << (8 * size)) - 1
            return int.from_bytes(f.cfg[reg : reg + size], "little")

        def on_write(uc_, off, size, value, _ud):
            writes.append((off, size, value))

        if lo + ((end - start + 1) << 20) <= 1 << 32:
            uc.mmio_map(lo, (end - start + 1) << 20, on_read, None, on_write, None)

    serial = bytearray()
    state: dict = {"exit": None}

    def on_out(uc_, port, size, value, _ud):
        if port == 0x3F8:
            serial.append(value & 0xFF)
        elif port == 0xF4:
            state["exit"] = value & 0xFF
            uc_.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INSN, on_out, None, 1, 0, x86_const.UC_X86_INS_OUT)
    uc.reg_write(x86_const.UC_X86_REG_EBX, START_INFO)
    uc.reg_write(x86_const.UC_X86_REG_ESP, 0x4000)  # the guest must set its own
    entry = pvh_entry(elf)
    assert entry is not None
    uc.emu_start(entry, 0xFFFFFFFF, count=max_insns)

    addr, size = report_symbol(elf)
    rep = parse_report(bytes(uc.mem_read(addr, size)), lambda gpa, n: bytes(uc.mem_read(gpa, n)))
    return Result(serial.decode("ascii"), state["exit"], reads, writes, rep, read_log)
