"""Helpers for the ACPI tests: running the real iasl, and a small AML decoder written from the spec.

The decoder is deliberately independent of pcihole.acpi.aml (it shares no code and reads bytes the
way ACPI 6.5 §20.2 describes them), so encoding and decoding cannot share a mistake.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")


@dataclass(frozen=True)
class Seg:
    id: int
    ecam_base: int
    start_bus: int
    end_bus: int


def byte_sum(data: bytes) -> int:
    return sum(data) % 256


# --- iasl --------------------------------------------------------------------------------------------

FIELD = re.compile(r"^\[([0-9A-F]+)h (\d+)\s+(\d+)\]\s+(.*?) : (.*)$")
DECODED_BIT = re.compile(r"^\s+([^\[\]:]+?) : (\d)$")


def run_iasl(tmp_path, *args: str) -> str:
    run = subprocess.run([IASL, *args], cwd=tmp_path, capture_output=True, text=True, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    return output


def disassemble_text(tmp_path, name: str, data: bytes) -> tuple[str, str]:
    """Run `iasl -d NAME.dat`; return NAME.dsl and iasl's output."""
    (tmp_path / f"{name}.dat").write_bytes(data)
    output = run_iasl(tmp_path, "-d", f"{name}.dat")
    return (tmp_path / f"{name}.dsl").read_text(), output


def disassemble(tmp_path, name: str, data: bytes) -> tuple[list[tuple[int, int, str, str]], str]:
    """The fields of a data table's disassembly as (offset, length, name, value), and iasl's output."""
    text, output = disassemble_text(tmp_path, name, data)
    fields = []
    for line in text.splitlines():
        match = FIELD.match(line)
        if match:
            offset_hex, offset_dec, length, field, value = match.groups()
            assert int(offset_hex, 16) == int(offset_dec)
            fields.append((int(offset_dec), int(length), field.strip(), value.strip()))
    return fields, output


def decoded_bits(text: str) -> list[tuple[str, int]]:
    """The "name : 0|1" lines iasl prints under a "(decoded below)" flags field, in order."""
    return [
        (m.group(1).strip(), int(m.group(2))) for line in text.splitlines() if (m := DECODED_BIT.match(line))
    ]


def header_fields(
    data: bytes, signature: str, description: str, revision: int = 1
) -> list[tuple[int, int, str, str]]:
    return [
        (0, 4, "Signature", f'"{signature}"    [{description}]'),
        (4, 4, "Table Length", f"{len(data):08X}"),
        (8, 1, "Revision", f"{revision:02X}"),
        (9, 1, "Checksum", f"{data[9]:02X}"),
        (10, 6, "Oem ID", '"PCIHOL"'),
        (16, 8, "Oem Table ID", f'"PHOL{signature}"'),
        (24, 4, "Oem Revision", "00000001"),
        (28, 4, "Asl Compiler ID", '"PHOL"'),
        (32, 4, "Asl Compiler Revision", "00000001"),
    ]


# --- an independent AML decoder (ACPI 6.5 §20.2) ------------------------------------------------------


def decode_pkg_length(data: bytes, at: int) -> tuple[int, int]:
    """(PkgLength value, bytes it takes) at data[at]. §20.2.4: bits 7-6 of the lead byte count the
    follow bytes; with none, bits 5-0 are the length; else bits 3-0 are its low nibble, bits 5-4 must
    be zero, and each follow byte adds 8 more significant bits."""
    lead = data[at]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, f"reserved bits set in PkgLeadByte {lead:#x}"
    value = lead & 0x0F
    for i in range(follow):
        value |= data[at + 1 + i] << (4 + 8 * i)
    return value, 1 + follow


def decode_integer(data: bytes, at: int) -> tuple[int, int]:
    """(value, bytes) of a ComputationalData integer at data[at] (§20.2.3)."""
    op = data[at]
    constants = {0x00: 0, 0x01: 1, 0xFF: (1 << 64) - 1}
    if op in constants:
        return constants[op], 1
    widths = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    assert op in widths, f"{op:#x} is not an integer opcode"
    n = widths[op]
    return int.from_bytes(data[at + 1 : at + 1 + n], "little"), 1 + n


def decode_eisa_id(value: int) -> str:
    """The text of a compressed EISA ID (§6.1.5): bytes in memory order are 5-bit letters then 4 nibbles."""
    raw = value.to_bytes(4, "little")
    word = raw[0] << 8 | raw[1]
    letters = "".join(chr(0x40 + (word >> shift & 0x1F)) for shift in (10, 5, 0))
    return letters + f"{raw[2]:02X}{raw[3]:02X}"


def buffers_after(data: bytes, marker: bytes) -> list[tuple[int, bytes]]:
    """Each Buffer that follows `marker` (e.g. NameOp "_CRS"): (offset of its byte list, the bytes)."""
    out = []
    at = data.find(marker)
    while at >= 0:
        p = at + len(marker)
        assert data[p] == 0x11, "not a BufferOp"
        length, n = decode_pkg_length(data, p + 1)
        size, m = decode_integer(data, p + 1 + n)
        start = p + 1 + n + m
        assert length == n + m + size, "PkgLength does not cover exactly BufferSize bytes"
        out.append((start, data[start : start + size]))
        at = data.find(marker, at + 1)
    return out
