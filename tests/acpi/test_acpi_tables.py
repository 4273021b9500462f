"""ACPI tables: layout and checksums checked in Python, then every field read back by the real iasl.

iasl (Debian acpica-tools) is an independent parser. Its 20200925 release (Debian 12) cannot `-d` an
RSDP file (AcGetOneTableFromFile() takes bytes 4-7, "PTR ", for a table length and gives up silently),
so the RSDP is checked the other way round: iasl compiles an RSDP data-table source with our field
values, computing both checksums itself, and its binary must equal ours byte for byte.
"""

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcihole.acpi import build_tables, write_tables

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")


@dataclass(frozen=True)
class Seg:
    id: int
    ecam_base: int
    start_bus: int
    end_bus: int


SEGMENTS = [Seg(0, 0xE0000000, 0, 255), Seg(1, 0xD0000000, 0, 63), Seg(3, 0xC0000000, 16, 31)]
BASE = 0x000E0000


def byte_sum(data: bytes) -> int:
    return sum(data) % 256


def test_rsdp_layout_and_both_checksums():
    t = build_tables(SEGMENTS, BASE)
    rsdp = t.tables["RSDP"]
    assert t.rsdp_gpa == BASE and t.blob[:36] == rsdp
    assert len(rsdp) == 36
    assert rsdp[0:8] == b"RSD PTR "
    assert rsdp[15] == 2  # revision: ACPI 2.0+
    assert struct.unpack_from("<I", rsdp, 16)[0] == 0  # no RSDT
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert struct.unpack_from("<Q", rsdp, 24)[0] == t.addresses["XSDT"]
    assert byte_sum(rsdp[:20]) == 0
    assert byte_sum(rsdp) == 0


def test_xsdt_points_at_mcfg_and_tables_sit_in_the_blob():
    t = build_tables(SEGMENTS, BASE)
    for name, data in t.tables.items():
        offset = t.addresses[name] - BASE
        assert t.blob[offset : offset + len(data)] == data
        assert t.addresses[name] % 16 == 0
        if name != "RSDP":
            assert data[0:4] == name.encode()
            assert struct.unpack_from("<I", data, 4)[0] == len(data)
            assert byte_sum(data) == 0
    xsdt = t.tables["XSDT"]
    assert len(xsdt) == 36 + 8
    assert struct.unpack_from("<Q", xsdt, 36)[0] == t.addresses["MCFG"]
    # No two tables overlap.
    spans = sorted((t.addresses[n], t.addresses[n] + len(d)) for n, d in t.tables.items())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


@given(
    st.lists(
        st.builds(
            Seg,
            st.integers(0, 0xFFFF),
            st.integers(0, (1 << 32) - 1).map(lambda x: x << 20 & 0xFFFFFFFF),
            st.integers(0, 255),
            st.integers(0, 255),
        ),
        max_size=8,
    ),
    st.integers(0, 1 << 40).map(lambda x: x * 16),
)
def test_mcfg_has_one_allocation_per_segment(segments, base):
    t = build_tables(segments, base)
    mcfg = t.tables["MCFG"]
    assert byte_sum(mcfg) == 0
    assert (len(mcfg) - 44) % 16 == 0 and (len(mcfg) - 44) // 16 == len(segments)  # pci_parse_mcfg's count
    for i, s in enumerate(segments):
        assert struct.unpack_from("<QHBBI", mcfg, 44 + 16 * i) == (
            s.ecam_base,
            s.id,
            s.start_bus,
            s.end_bus,
            0,
        )
    assert t.rsdp_gpa == base
    assert struct.unpack_from("<Q", t.tables["XSDT"], 36)[0] == t.addresses["MCFG"]


@pytest.mark.parametrize("base", [0xE0001, 0xE0008, -16])
def test_base_must_be_16_byte_aligned(base):
    with pytest.raises(ValueError, match="aligned"):
        build_tables(SEGMENTS, base)


def test_write_tables_names_files_by_signature(tmp_path):
    t = build_tables(SEGMENTS, BASE)
    written = write_tables(t, tmp_path / "out")
    assert sorted(p.name for p in written) == ["MCFG.dat", "RSDP.dat", "XSDT.dat"]
    for path in written:
        assert path.read_bytes() == t.tables[path.stem]


# --- read back with iasl -----------------------------------------------------------------------------

FIELD = re.compile(r"^\[([0-9A-F]+)h (\d+)\s+(\d+)\]\s+(.*?) : (.*)$")


def disassemble(tmp_path, name: str, data: bytes) -> tuple[list[tuple[int, int, str, str]], str]:
    """Run `iasl -d NAME.dat`; return the fields of NAME.dsl as (offset, length, name, value) and iasl's output."""
    path = tmp_path / f"{name}.dat"
    path.write_bytes(data)
    run = subprocess.run([IASL, "-d", path.name], cwd=tmp_path, capture_output=True, text=True, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    fields = []
    for line in (tmp_path / f"{name}.dsl").read_text().splitlines():
        match = FIELD.match(line)
        if match:
            offset_hex, offset_dec, length, field, value = match.groups()
            assert int(offset_hex, 16) == int(offset_dec)
            fields.append((int(offset_dec), int(length), field.strip(), value.strip()))
    return fields, output


def header_fields(data: bytes, signature: str, description: str) -> list[tuple[int, int, str, str]]:
    return [
        (0, 4, "Signature", f'"{signature}"    [{description}]'),
        (4, 4, "Table Length", f"{len(data):08X}"),
        (8, 1, "Revision", "01"),
        (9, 1, "Checksum", f"{data[9]:02X}"),
        (10, 6, "Oem ID", '"PCIHOL"'),
        (16, 8, "Oem Table ID", f'"PHOL{signature}"'),
        (24, 4, "Oem Revision", "00000001"),
        (28, 4, "Asl Compiler ID", '"PHOL"'),
        (32, 4, "Asl Compiler Revision", "00000001"),
    ]


@needs_iasl
def test_iasl_reads_every_mcfg_field(tmp_path):
    t = build_tables(SEGMENTS, BASE)
    fields, output = disassemble(tmp_path, "MCFG", t.tables["MCFG"])
    assert "checksum" not in output.lower()  # iasl warns "Incorrect checksum in table [MCFG]" otherwise
    expected = header_fields(t.tables["MCFG"], "MCFG", "Memory Mapped Configuration table")
    expected.append((36, 8, "Reserved", "0000000000000000"))
    for i, s in enumerate(SEGMENTS):
        at = 44 + 16 * i
        expected += [
            (at, 8, "Base Address", f"{s.ecam_base:016X}"),
            (at + 8, 2, "Segment Group Number", f"{s.id:04X}"),
            (at + 10, 1, "Start Bus Number", f"{s.start_bus:02X}"),
            (at + 11, 1, "End Bus Number", f"{s.end_bus:02X}"),
            (at + 12, 4, "Reserved", "00000000"),
        ]
    assert fields == expected


@needs_iasl
def test_iasl_reads_every_xsdt_field(tmp_path):
    t = build_tables(SEGMENTS, BASE)
    fields, output = disassemble(tmp_path, "XSDT", t.tables["XSDT"])
    assert "checksum" not in output.lower()
    expected = header_fields(t.tables["XSDT"], "XSDT", "Extended System Description Table")
    expected.append((36, 8, "ACPI Table Address   0", f"{t.addresses['MCFG']:016X}"))
    assert fields == expected


@needs_iasl
def test_iasl_notices_a_bad_checksum(tmp_path):
    """The check above is not vacuous: iasl does complain about a wrong checksum."""
    bad = bytearray(build_tables(SEGMENTS, BASE).tables["MCFG"])
    bad[9] ^= 1
    _, output = disassemble(tmp_path, "MCFG", bytes(bad))
    assert "Incorrect checksum" in output


@needs_iasl
def test_iasl_compiles_the_same_rsdp(tmp_path):
    t = build_tables(SEGMENTS, 0x7FFF0000)
    source = "\n".join(
        [
            '[0008]                          Signature : "RSD PTR "',
            "[0001]                           Checksum : 00",
            '[0006]                             Oem ID : "PCIHOL"',
            "[0001]                           Revision : 02",
            "[0004]                       RSDT Address : 00000000",
            "[0004]                             Length : 00000024",
            f"[0008]                       XSDT Address : {t.addresses['XSDT']:016X}",
            "[0001]                  Extended Checksum : 00",
            "[0003]                           Reserved : 000000",
            "",
        ]
    )
    (tmp_path / "rsdp.asl").write_text(source)
    run = subprocess.run([IASL, "rsdp.asl"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "rsdp.aml").read_bytes() == t.tables["RSDP"]


@needs_iasl
def test_iasl_reads_the_default_machine_mcfg(tmp_path):
    from pcihole.machine import machinefile

    m = machinefile.load_default()
    t = build_tables(m.segments, BASE)
    written = {p.name: p for p in write_tables(t, tmp_path)}
    fields, _ = disassemble(tmp_path, "MCFG", written["MCFG.dat"].read_bytes())
    values = {name: value for _, _, name, value in fields}
    assert values["Base Address"] == "00000000E0000000"
    assert values["Start Bus Number"] == "00" and values["End Bus Number"] == "FF"
