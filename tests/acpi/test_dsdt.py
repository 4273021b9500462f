"""The DSDT, read back by the real iasl: disassembled to ASL (every device, id, number and range
checked), recompiled without errors, and the recompiled AML equal to ours byte for byte."""

import re
import struct

import pytest

from pcihole.acpi import MmioWindow, build_tables
from pcihole.acpi.dsdt import build_dsdt, host_bridge_name
from tests.acpi.acpi_helpers import (
    Seg,
    buffers_after,
    byte_sum,
    disassemble_text,
    needs_iasl,
    run_iasl,
)

BASE = 0x000E0000
SEGMENTS = [Seg(0, 0xE0000000, 0, 255), Seg(1, 0xD0000000, 0, 63), Seg(3, 0xC0000000, 16, 31)]
#: Worked out by hand from pci_windows.py's rule: the aperture [0xC0000000, 0xFEC00000) minus the ECAM
#: windows [0xE0000000, 0xEFFFFFFF], [0xD0000000, 0xD3FFFFFF], [0xC1000000, 0xC1FFFFFF] leaves room for
#: three aligned 128 MiB blocks (not for three of 256 MiB), the first three in address order.
SEGMENT_WINDOWS = [(0xC8000000, 0xCFFFFFFF), (0xD8000000, 0xDFFFFFFF), (0xF0000000, 0xF7FFFFFF)]

DEVICE = re.compile(r"^        Device \((\w{4})\)$", re.M)
NAME_EISAID = re.compile(r'Name \((_HID|_CID), EisaId \("(\w{7})"\)')
NAME_INTEGER = re.compile(r"Name \((_SEG|_BBN|_UID), (Zero|One|0x[0-9A-F]+)\)")
DESCRIPTOR = re.compile(r"^\s+(\w+) \(([^\n]*)\n((?:\s+0x[0-9A-F]+,?\s+// [^\n]+\n)+)", re.M)
DESCRIPTOR_FIELD = re.compile(r"^\s+(0x[0-9A-F]+),?\s+// (.+?)\s*$", re.M)


def asl_int(text: str) -> int:
    constants = {"Zero": 0, "One": 1}
    return constants[text] if text in constants else int(text, 16)


def devices(asl: str) -> dict[str, str]:
    """Each `Device (XXXX)` of the disassembly -> its text up to the next device or the end."""
    marks = list(DEVICE.finditer(asl))
    ends = [m.start() for m in marks[1:]] + [len(asl)]
    return {m.group(1): asl[m.end() : end] for m, end in zip(marks, ends, strict=True)}


def descriptors(block: str) -> list[tuple[str, str, dict[str, int]]]:
    """(kind, first line of flags, {field comment: value}) for each resource descriptor in a block."""
    return [
        (m.group(1), m.group(2).strip(), {f: int(v, 16) for v, f in DESCRIPTOR_FIELD.findall(m.group(3))})
        for m in DESCRIPTOR.finditer(block)
    ]


def host_bridge_block(block: str) -> dict:
    return {
        "ids": dict(NAME_EISAID.findall(block)),
        "ints": {k: asl_int(v) for k, v in NAME_INTEGER.findall(block)},
        "resources": descriptors(block),
    }


GiB = 1 << 30


def io_windows(count: int) -> list[tuple[int, int]]:
    """By hand from pci_windows.py's rule: [0x1000, 0xFFFF] split evenly in 4 KiB units."""
    size = 15 // count * 0x1000
    return [(0x1000 + i * size, 0x1000 + (i + 1) * size - 1) for i in range(count)]


def mem64_windows(count: int) -> list[tuple[int, int]]:
    """By hand: [256 GiB, 512 GiB) in equal power-of-two blocks (1 -> 256 GiB, 2-3 -> 64 or 128, 5 -> 32)."""
    size = {1: 256, 2: 128, 3: 64, 4: 64, 5: 32}[count] * GiB
    return [(256 * GiB + i * size, 256 * GiB + (i + 1) * size - 1) for i in range(count)]


def expected_host_bridge(seg, window, io=None, mem64=None) -> dict:
    resources = [
        (
            "WordBusNumber",
            "ResourceProducer, MinFixed, MaxFixed, PosDecode,",
            {
                "Granularity": 0,
                "Range Minimum": seg.start_bus,
                "Range Maximum": seg.end_bus,
                "Translation Offset": 0,
                "Length": seg.end_bus - seg.start_bus + 1,
            },
        )
    ]
    if io is not None:
        first, last = io
        resources.append(
            (
                "WordIO",
                "ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,",
                {
                    "Granularity": 0,
                    "Range Minimum": first,
                    "Range Maximum": last,
                    "Translation Offset": 0,
                    "Length": last - first + 1,
                },
            )
        )
    if window is not None:
        first, last = window
        resources.append(
            (
                "DWordMemory",
                "ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
                {
                    "Granularity": 0,
                    "Range Minimum": first,
                    "Range Maximum": last,
                    "Translation Offset": 0,
                    "Length": last - first + 1,
                },
            )
        )
    if mem64 is not None:
        first, last = mem64
        resources.append(
            (
                "QWordMemory",
                "ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
                {
                    "Granularity": 0,
                    "Range Minimum": first,
                    "Range Maximum": last,
                    "Translation Offset": 0,
                    "Length": last - first + 1,
                },
            )
        )
    return {
        "ids": {"_HID": "PNP0A08", "_CID": "PNP0A03"},
        "ints": {"_SEG": seg.id, "_BBN": seg.start_bus, "_UID": seg.id},
        "resources": resources,
    }


def ecam_fixed(seg) -> tuple[str, str, dict[str, int]]:
    base = seg.ecam_base + (seg.start_bus << 20)
    size = (seg.end_bus - seg.start_bus + 1) << 20
    return ("Memory32Fixed", "ReadWrite,", {"Address Base": base, "Address Length": size})


def zero_end_tag_checksums(dsdt: bytes) -> bytes:
    """Our DSDT with each _CRS end tag's checksum set to 0, as iasl writes it; each was valid."""
    out = bytearray(dsdt)
    crs = buffers_after(dsdt, b"\x08_CRS")
    assert crs, "no _CRS buffer found"
    for start, data in crs:
        assert data[-2] == 0x79 and byte_sum(data) == 0
        out[start + len(data) - 1] = 0
    return bytes(out)


def check_recompiles_to_the_same_aml(tmp_path, asl: str, dsdt: bytes) -> None:
    """iasl compiles the disassembly with no error or warning, to our AML. -on keeps "\\_SB" as we wrote
    it (iasl would otherwise shorten it to "_SB", the same name at the root)."""
    (tmp_path / "recompiled.dsl").write_text(asl)
    output = run_iasl(tmp_path, "-on", "recompiled.dsl")
    assert "0 Errors, 0 Warnings" in output, output
    recompiled = (tmp_path / "recompiled.aml").read_bytes()
    assert recompiled[:4] == b"DSDT" and struct.unpack_from("<I", recompiled, 4)[0] == len(dsdt)
    assert recompiled[36:] == zero_end_tag_checksums(dsdt)[36:]


@needs_iasl
def test_iasl_reads_every_dsdt_object(tmp_path):
    t = build_tables(SEGMENTS, BASE)
    dsdt = t.tables["DSDT"]
    assert byte_sum(dsdt) == 0
    asl, output = disassemble_text(tmp_path, "DSDT", dsdt)
    assert (
        "checksum" not in output.lower() and "error" not in output.lower() and "warning" not in output.lower()
    )
    assert 'DefinitionBlock ("", "DSDT", 2, "PCIHOL", "PHOLDSDT", 0x00000001)' in asl
    assert "    Scope (\\_SB)\n" in asl
    found = devices(asl)
    assert list(found) == ["PCI0", "PCI1", "PCI3", "MBRD"]
    windows = zip(
        SEGMENTS, ["PCI0", "PCI1", "PCI3"], SEGMENT_WINDOWS, io_windows(3), mem64_windows(3), strict=True
    )
    for seg, name, window, io, mem64 in windows:
        assert host_bridge_block(found[name]) == expected_host_bridge(seg, window, io, mem64), name
    mbrd = found["MBRD"]
    assert NAME_EISAID.findall(mbrd) == [("_HID", "PNP0C02")]
    assert NAME_INTEGER.findall(mbrd) == [("_UID", "Zero")]
    assert descriptors(mbrd) == [ecam_fixed(s) for s in SEGMENTS]
    s5 = re.search(r"Name \(\\_S5, Package \(0x04\)[^{]*\{\s*(.*?)\s*\}\)", asl, re.S)
    assert s5 is not None
    assert [asl_int(v.strip()) for v in s5.group(1).split(",")] == [5, 0, 0, 0]
    check_recompiles_to_the_same_aml(tmp_path, asl, dsdt)


@needs_iasl
def test_default_machine_dsdt(tmp_path):
    from pcihole.machine import machinefile

    segments = machinefile.load_default().segments
    t = build_tables(segments, BASE)
    asl, _ = disassemble_text(tmp_path, "DSDT", t.tables["DSDT"])
    found = devices(asl)
    assert list(found) == ["PCI0", "MBRD"]
    # One segment at 0xE0000000: its BAR window is all of [3 GiB, 0xE0000000).
    # I/O [0x1000, 0xFFFF] and 64-bit memory [256 GiB, 512 GiB) whole.
    assert host_bridge_block(found["PCI0"]) == expected_host_bridge(
        segments[0], (0xC0000000, 0xDFFFFFFF), (0x1000, 0xFFFF), (256 * GiB, 512 * GiB - 1)
    )
    assert descriptors(found["MBRD"]) == [
        ("Memory32Fixed", "ReadWrite,", {"Address Base": 0xE0000000, "Address Length": 0x10000000})
    ]
    check_recompiles_to_the_same_aml(tmp_path, asl, t.tables["DSDT"])


@needs_iasl
def test_names_for_large_segment_ids_and_ecam_above_4_gib(tmp_path):
    segments = [
        Seg(0xF, 0x10000000, 0, 0),
        Seg(0x10, 0x10100000, 1, 1),
        Seg(0xFF, 0x10200000, 2, 3),
        Seg(0x100, 0x10400000, 4, 7),
        Seg(0xFFFF, 0xFFF00000, 0, 1),  # ends above 4 GiB: not a Memory32Fixed
    ]
    t = build_tables(segments, BASE)
    asl, _ = disassemble_text(tmp_path, "DSDT", t.tables["DSDT"])
    found = devices(asl)
    assert list(found) == ["PCIF", "PC10", "PCFF", "R003", "R004", "MBRD"]
    for i, (seg, name, window) in enumerate(zip(segments, found, t.pci_windows, strict=False)):
        expected_window = None if window is None else (window.base, window.last)
        expected = expected_host_bridge(seg, expected_window, io_windows(5)[i], mem64_windows(5)[i])
        assert host_bridge_block(found[name]) == expected
    assert descriptors(found["MBRD"]) == [ecam_fixed(s) for s in segments[:4]] + [
        (
            "QWordMemory",
            "ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
            {
                "Granularity": 0,
                "Range Minimum": 0xFFF00000,
                "Range Maximum": 0x1000FFFFF,
                "Translation Offset": 0,
                "Length": 0x200000,
            },
        )
    ]
    check_recompiles_to_the_same_aml(tmp_path, asl, t.tables["DSDT"])


@needs_iasl
def test_a_bridge_without_room_gets_no_memory_window(tmp_path):
    segments = [Seg(0, 0xC0000000, 0, 255), Seg(1, 0xD0000000, 0, 255)]
    aperture = MmioWindow(0xC0000000, 0x20000000)  # all of it is ECAM
    t = build_tables(segments, BASE, mmio_aperture=aperture)
    assert t.pci_windows == (None, None)
    asl, _ = disassemble_text(tmp_path, "DSDT", t.tables["DSDT"])
    found = devices(asl)
    for seg, io, mem64 in zip(segments, io_windows(2), mem64_windows(2), strict=True):
        assert host_bridge_block(found[f"PCI{seg.id}"]) == expected_host_bridge(seg, None, io, mem64)
    check_recompiles_to_the_same_aml(tmp_path, asl, t.tables["DSDT"])


def test_host_bridge_names_are_unique_and_valid():
    names = [host_bridge_name(i, i) for i in range(0x1000)]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]{3}", n) for n in names)
    assert host_bridge_name(0xABCD, 7) == "R007"
    with pytest.raises(ValueError, match="4096"):
        host_bridge_name(0x1000, 0x1000)


def test_dsdt_refuses_duplicate_segments_and_inverted_bus_ranges():
    with pytest.raises(ValueError, match="not unique"):
        build_dsdt([Seg(1, 0xE0000000, 0, 0), Seg(1, 0xD0000000, 0, 0)], [None, None])
    with pytest.raises(ValueError, match="bus range 5-4"):
        build_dsdt([Seg(0, 0xE0000000, 5, 4)], [None])
    with pytest.raises(ValueError, match="windows"):
        build_dsdt([Seg(0, 0xE0000000, 0, 0)], [])


def test_four_segments_fit_the_bios_area():
    from pcihole.machine import layout
    from pcihole.pci import synthetic

    topo = synthetic.generate(24, buses=256, segments=4)
    t = build_tables(topo.segments, layout.ACPI_GPA)
    assert len(t.blob) < layout.ACPI_MAX == 128 * 1024
    assert len(t.blob) < 2048


@needs_iasl
def test_serial_port_device_with_its_ports_and_edge_interrupt(tmp_path):
    """COM1 as pcihole's machines describe it: PNP0501 with IO 0x3F8-0x3FF and GSI 4, edge, active
    high (Linux has no legacy PIC in a hardware-reduced machine, so only this gives the UART an IRQ)."""
    t = build_tables(SEGMENTS[:1], BASE, serial_ports=[(0x3F8, 4)])
    asl, _ = disassemble_text(tmp_path, "DSDT", t.tables["DSDT"])
    found = devices(asl)
    assert list(found) == ["PCI0", "MBRD", "COM1"]
    com1 = found["COM1"]
    assert dict(NAME_EISAID.findall(com1)) == {"_HID": "PNP0501"}
    assert {k: asl_int(v) for k, v in NAME_INTEGER.findall(com1)} == {"_UID": 0}
    assert descriptors(com1)[0] == (
        "IO",
        "Decode16,",
        {"Range Minimum": 0x3F8, "Range Maximum": 0x3F8, "Alignment": 1, "Length": 8},
    )
    assert re.search(
        r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s+\{\s+0x00000004,", com1
    )
    check_recompiles_to_the_same_aml(tmp_path, asl, t.tables["DSDT"])
