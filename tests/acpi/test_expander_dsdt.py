"""Expander buses in the DSDT, read back by the real iasl: a PNP0A08 per expander with its _SEG, _BBN
and bus range, the main host bridge's range cut below it (as QEMU's build_dsdt() does for pxb-pcie),
and the disassembly recompiling without errors."""

import re

import pytest

from pcihole.acpi import ExpanderBus, build_tables
from pcihole.acpi.expander_bridge import EXPANDER_UID_BASE, expander_name, main_root_last_bus
from tests.acpi.acpi_helpers import Seg, disassemble_text, needs_iasl, run_iasl

BASE = 0x000E0000
DEVICE = re.compile(r"^        Device \((\w{4})\)$", re.M)
NAME_INTEGER = re.compile(r"Name \((_SEG|_BBN|_UID), (Zero|One|0x[0-9A-F]+)\)")
BUS_RANGE = re.compile(
    r"WordBusNumber \(.*?\n\s+0x([0-9A-F]+),\s+// Granularity\n"
    r"\s+0x([0-9A-F]+),\s+// Range Minimum\n"
    r"\s+0x([0-9A-F]+),\s+// Range Maximum",
    re.S,
)


def asl_int(text: str) -> int:
    constants = {"Zero": 0, "One": 1}
    return constants[text] if text in constants else int(text, 16)


def devices(asl: str) -> dict[str, str]:
    marks = list(DEVICE.finditer(asl))
    ends = [m.start() for m in marks[1:]] + [len(asl)]
    return {m.group(1): asl[m.end() : end] for m, end in zip(marks, ends, strict=True)}


def summary(block: str) -> tuple[dict[str, int], tuple[int, int]]:
    ints = {k: asl_int(v) for k, v in NAME_INTEGER.findall(block)}
    match = BUS_RANGE.search(block)
    assert match is not None, block
    return ints, (int(match.group(2), 16), int(match.group(3), 16))


def test_names_and_uids_are_unique_and_apart_from_host_bridges():
    assert expander_name(ExpanderBus(0, 0x80, 0x8F), 0) == "X080"
    assert expander_name(ExpanderBus(0xF, 0x01, 0x01), 3) == "XF01"
    assert expander_name(ExpanderBus(0x10, 0x80, 0x8F), 7) == "Y007"
    with pytest.raises(ValueError, match="no name left"):
        expander_name(ExpanderBus(0x10, 0x80, 0x8F), 0x1000)
    assert ExpanderBus(0xFFFF, 0xFF, 0xFF).uid > 0xFFFF and ExpanderBus(0, 0, 0).uid == EXPANDER_UID_BASE


def test_main_root_bus_ends_below_the_lowest_expander_of_its_segment():
    seg = Seg(0, 0xE0000000, 0, 255)
    assert main_root_last_bus(seg, []) == 255
    expanders = [ExpanderBus(0, 0xC0, 0xFF), ExpanderBus(0, 0x80, 0x8F), ExpanderBus(1, 0x10, 0x1F)]
    assert main_root_last_bus(seg, expanders) == 0x7F


@needs_iasl
def test_iasl_reads_the_expander_bridges(tmp_path):
    segments = [Seg(0, 0xE0000000, 0, 255), Seg(0x20, 0xD0000000, 0, 63)]
    expanders = [ExpanderBus(0, 0x80, 0x8F), ExpanderBus(0, 0xA0, 0xFF), ExpanderBus(0x20, 0x30, 0x3F)]
    dsdt = build_tables(segments, BASE, expanders=expanders).tables["DSDT"]
    asl, output = disassemble_text(tmp_path, "DSDT", dsdt)
    assert "error" not in output.lower() and "warning" not in output.lower()
    found = devices(asl)
    assert list(found) == ["PCI0", "PC20", "X080", "X0A0", "Y002", "MBRD"]
    assert summary(found["PCI0"]) == ({"_SEG": 0, "_BBN": 0, "_UID": 0}, (0, 0x7F))
    assert summary(found["PC20"]) == ({"_SEG": 0x20, "_BBN": 0, "_UID": 0x20}, (0, 0x2F))
    for name, x in zip(["X080", "X0A0", "Y002"], expanders, strict=True):
        assert (
            'Name (_HID, EisaId ("PNP0A08")' in found[name]
            and 'Name (_CID, EisaId ("PNP0A03")' in found[name]
        )
        assert summary(found[name]) == (
            {"_SEG": x.segment, "_BBN": x.bus, "_UID": x.uid},
            (x.bus, x.last_bus),
        )
        assert "DWordMemory" not in found[name]
    (tmp_path / "recompiled.dsl").write_text(asl)
    assert "0 Errors, 0 Warnings" in run_iasl(tmp_path, "-on", "recompiled.dsl")


@needs_iasl
def test_the_expander_example_machine_describes_its_expander(tmp_path):
    from pathlib import Path

    from pcihole.machine.builder import expander_buses
    from pcihole.machine.machinefile import load

    spec = load(Path(__file__).resolve().parents[2] / "examples" / "expander.toml")
    dsdt = build_tables(spec.segments, BASE, expanders=expander_buses(spec)).tables["DSDT"]
    found = devices(disassemble_text(tmp_path, "DSDT", dsdt)[0])
    (x,) = spec.topology.expanders
    assert summary(found["PCI0"])[1] == (0, x.bus - 1)
    assert summary(found[f"X0{x.bus:02X}"]) == (
        {"_SEG": 0, "_BBN": x.bus, "_UID": EXPANDER_UID_BASE | x.bus},
        (x.bus, x.last_bus),
    )


def ranges_of(block: str) -> dict[str, list[tuple[int, int]]]:
    """{"WordIO" | "DWordMemory" | "QWordMemory": [(first, last), ...]} of a device's _CRS."""
    from tests.acpi.test_dsdt import descriptors

    out: dict[str, list[tuple[int, int]]] = {}
    for kind, flags, fields in descriptors(block):
        if kind != "WordBusNumber":
            assert flags.startswith("ResourceProducer"), (kind, flags)
            out.setdefault(kind, []).append((fields["Range Minimum"], fields["Range Maximum"]))
    return out


@needs_iasl
def test_the_expander_gets_windows_for_its_bars_carved_from_its_segments(tmp_path):
    """QEMU's build_crs()/crs_range_set for pxb: the expander's _CRS has I/O, 32-bit and 64-bit windows
    as large as what is below it needs (pcihole.pci.bridge_windows), and PCI0's _CRS has the rest of
    the segment's windows, so every address belongs to exactly one root bridge."""
    from pathlib import Path

    from pcihole.machine.builder import acpi_tables
    from pcihole.machine.machinefile import load
    from pcihole.pci.bridge_windows import root_bus_need

    spec = load(Path(__file__).resolve().parents[2] / "examples" / "expander.toml")
    asl, output = disassemble_text(tmp_path, "DSDT", acpi_tables(spec).tables["DSDT"])
    assert "error" not in output.lower() and "warning" not in output.lower()
    found = devices(asl)
    main, expander = ranges_of(found["PCI0"]), ranges_of(found["X080"])
    need = root_bus_need(spec.topology, 0, 0x80)
    (io,), (mem32,), (mem64,) = expander["WordIO"], expander["DWordMemory"], expander["QWordMemory"]
    assert io[1] - io[0] + 1 == need.io  # whole 4 KiB units
    for (first, last), wanted in ((mem32, need.mem32), (mem64, need.mem64)):
        size = last - first + 1
        assert size >= wanted and size & (size - 1) == 0 and first % size == 0  # a naturally aligned block
    # Together, PCI0 and X080 cover the segment's windows exactly once (one segment: [0x1000, 0xFFFF],
    # [3 GiB, ECAM at 0xE0000000), [256 GiB, 512 GiB)).
    segment_windows = {"WordIO": (0x1000, 0xFFFF), "DWordMemory": (0xC0000000, 0xDFFFFFFF)}
    segment_windows["QWordMemory"] = (256 << 30, (512 << 30) - 1)
    for kind, (first, last) in segment_windows.items():
        pieces = sorted(main[kind] + expander[kind])
        assert pieces[0][0] == first and pieces[-1][1] == last, (kind, pieces)
        assert all(a[1] + 1 == b[0] for a, b in zip(pieces, pieces[1:], strict=False)), (kind, pieces)
    (tmp_path / "recompiled.dsl").write_text(asl)
    assert "0 Errors, 0 Warnings" in run_iasl(tmp_path, "-on", "recompiled.dsl")


def test_expanders_that_need_more_than_their_segment_has_are_refused():
    from pcihole.pci.bridge_windows import WindowNeed

    greedy = ExpanderBus(0, 0x80, 0x8F, need=WindowNeed(mem32=0x40000000))
    with pytest.raises(ValueError, match="32-bit memory"):
        build_tables([Seg(0, 0xE0000000, 0, 255)], BASE, expanders=[greedy])
