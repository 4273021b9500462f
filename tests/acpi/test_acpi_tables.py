"""ACPI tables: layout and checksums checked in Python, then every field read back by the real iasl.

iasl (Debian acpica-tools) is an independent parser. Its 20200925 release (Debian 12) cannot `-d` an
RSDP file (AcGetOneTableFromFile() takes bytes 4-7, "PTR ", for a table length and gives up silently),
so the RSDP is checked the other way round: iasl compiles an RSDP data-table source with our field
values, computing both checksums itself, and its binary must equal ours byte for byte.
"""

import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcihole.acpi import build_tables, write_tables
from tests.acpi.acpi_helpers import IASL, Seg, byte_sum, disassemble, header_fields, needs_iasl

SEGMENTS = [Seg(0, 0xE0000000, 0, 255), Seg(1, 0xD0000000, 0, 63), Seg(3, 0xC0000000, 16, 31)]
BASE = 0x000E0000


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


def test_xsdt_lists_fadt_madt_mcfg_and_tables_sit_in_the_blob():
    t = build_tables(SEGMENTS, BASE)
    for name, data in t.tables.items():
        offset = t.addresses[name] - BASE
        assert t.blob[offset : offset + len(data)] == data
        assert t.addresses[name] % 16 == 0
        if name != "RSDP":
            assert data[0:4] == name.encode()
            assert struct.unpack_from("<I", data, 4)[0] == len(data)
            assert byte_sum(data) == 0
    assert sorted(t.tables) == ["APIC", "DSDT", "FACP", "MCFG", "RSDP", "XSDT"]
    xsdt = t.tables["XSDT"]
    assert len(xsdt) == 36 + 3 * 8
    assert struct.unpack_from("<3Q", xsdt, 36) == (
        t.addresses["FACP"],
        t.addresses["APIC"],
        t.addresses["MCFG"],
    )
    # The DSDT is reached through the FADT, 32-bit and 64-bit pointers alike.
    fadt = t.tables["FACP"]
    assert struct.unpack_from("<I", fadt, 40)[0] == t.addresses["DSDT"]
    assert struct.unpack_from("<Q", fadt, 140)[0] == t.addresses["DSDT"]
    # No two tables overlap.
    spans = sorted((t.addresses[n], t.addresses[n] + len(d)) for n, d in t.tables.items())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


def _segment(id_, ecam_mib, buses):
    first, last = sorted(buses)
    return Seg(id_, ecam_mib << 20 & 0xFFFFFFFF, first, last)


@given(
    st.lists(
        st.builds(
            _segment,
            st.integers(0, 0xFFFF),
            st.integers(0, (1 << 32) - 1),
            st.tuples(st.integers(0, 255), st.integers(0, 255)),
        ),
        max_size=8,
        unique_by=lambda s: s.id,
    ),
    st.integers(0, 1 << 40).map(lambda x: x * 16),
)
def test_every_table_follows_the_segments_anywhere(segments, base):
    t = build_tables(segments, base)
    for name, data in t.tables.items():
        assert byte_sum(data) == 0, name
    mcfg = t.tables["MCFG"]
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
    assert struct.unpack_from("<Q", t.tables["XSDT"], 52)[0] == t.addresses["MCFG"]
    # The 32-bit DSDT pointer is set only where it can hold the address; X_DSDT always is.
    dsdt = t.addresses["DSDT"]
    assert struct.unpack_from("<I", t.tables["FACP"], 40)[0] == (dsdt if dsdt < 1 << 32 else 0)
    assert struct.unpack_from("<Q", t.tables["FACP"], 140)[0] == dsdt
    assert len(t.pci_windows) == len(segments)


@pytest.mark.parametrize("base", [0xE0001, 0xE0008, -16])
def test_base_must_be_16_byte_aligned(base):
    with pytest.raises(ValueError, match="aligned"):
        build_tables(SEGMENTS, base)


def test_write_tables_names_files_by_signature(tmp_path):
    t = build_tables(SEGMENTS, BASE)
    written = write_tables(t, tmp_path / "out")
    # acpixtract's names: the signature, so the FADT is FACP.dat and the MADT APIC.dat.
    assert sorted(p.name for p in written) == [
        "APIC.dat",
        "DSDT.dat",
        "FACP.dat",
        "MCFG.dat",
        "RSDP.dat",
        "XSDT.dat",
    ]
    for path in written:
        assert path.read_bytes() == t.tables[path.stem]


# --- read back with iasl -----------------------------------------------------------------------------


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
    for i, name in enumerate(["FACP", "APIC", "MCFG"]):
        expected.append((36 + 8 * i, 8, f"ACPI Table Address   {i}", f"{t.addresses[name]:016X}"))
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
