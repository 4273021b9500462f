"""A tiny AML encoder: the few ACPI Machine Language terms a static DSDT needs (ACPI 6.5 §20.2).

Every function returns the bytes of one term; terms compose by concatenation. What is here:

    names       name_seg, name_string            §20.2.2 Name Objects Encoding
    integers    integer (ZeroOp/OneOp/OnesOp, BytePrefix .. QWordPrefix)   §20.2.3 Data Objects Encoding
    lengths     pkg_length                       §20.2.4 Package Length Encoding
    objects     name, scope, device, package, buffer, string          §20.2.5 Term Objects Encoding
    ids         eisa_id                          §6.1.5 _HID ("EISA type ID ... compressed")

Resource descriptors for _CRS buffers are in resources.py. ACPICA's interpreter (what Linux runs,
drivers/acpi/acpica/) decodes exactly these encodings; the tests decode them again independently and
have the real `iasl -d` disassemble the DSDT built from them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

# §20.2.3 Data Objects Encoding.
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
# §20.2.5 Term Objects Encoding.
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
# §20.2.2 Name Objects Encoding.
ROOT_CHAR = ord("\\")
PARENT_PREFIX_CHAR = ord("^")
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

NAME_SEG_SIZE = 4
MAX_INTEGER = (1 << 64) - 1  # DSDT revision >= 2: integers are 64 bits (§5.2.11.1)
#: §20.2.4: "The high 2 bits of the first byte reveal how many follow bytes are in the PkgLength. If the
#: PkgLength has only one byte, bit 0 through 5 are used to encode the package length (in other words,
#: values 0-63). If the package length value is more than 63, more than one byte must be used for the
#: encoding in which case bit 4 and 5 of the PkgLeadByte are reserved and must be zero. ... Note: The
#: maximum value for a PkgLength is 2**28."
MAX_PKG_LENGTH = (1 << 28) - 1
ONE_BYTE_PKG_LENGTH_MAX = 0x3F

_NAME_SEG = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")  # §20.2.2: LeadNameChar NameChar NameChar NameChar


class AmlError(ValueError):
    """A value that has no AML encoding (a bad name, an integer out of range, a package too long)."""


# --- names -----------------------------------------------------------------------------------------


def name_seg(seg: str) -> bytes:
    """A NameSeg: 4 characters, padded with '_' as ASL does ("_SB" -> b"_SB_")."""
    if not _NAME_SEG.match(seg):
        raise AmlError(f"{seg!r} is not an ACPI name segment (1-4 of [A-Z0-9_], not starting with a digit)")
    return seg.ljust(NAME_SEG_SIZE, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString from ASL path syntax: "\\_SB.PCI0", "^MBRD", "_CRS" (§20.2.2)."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    match len(segs):
        case 0:
            return prefix + bytes([NULL_NAME])
        case 1:
            return prefix + segs[0]
        case 2:
            return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
        case n if n <= 0xFF:
            return prefix + bytes([MULTI_NAME_PREFIX, n]) + b"".join(segs)
    raise AmlError(f"name path {path!r} has {len(segs)} segments, more than 255")


# --- data ------------------------------------------------------------------------------------------


def integer(value: int) -> bytes:
    """The shortest ComputationalData for `value`, as iasl picks it: ZeroOp, OneOp, OnesOp (all 64 bits
    set), then BytePrefix/WordPrefix/DWordPrefix/QWordPrefix followed by the little-endian value."""
    if not 0 <= value <= MAX_INTEGER:
        raise AmlError(f"integer {value:#x} does not fit in 64 bits")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == MAX_INTEGER:
        return bytes([ONES_OP])
    if value <= 0xFF:
        return struct.pack("<BB", BYTE_PREFIX, value)
    if value <= 0xFFFF:
        return struct.pack("<BH", WORD_PREFIX, value)
    if value <= 0xFFFFFFFF:
        return struct.pack("<BI", DWORD_PREFIX, value)
    return struct.pack("<BQ", QWORD_PREFIX, value)


def string(text: str) -> bytes:
    """A String: StringPrefix, ASCII characters 0x01-0x7F, NullChar (§20.2.3)."""
    raw = text.encode("ascii")
    if 0 in raw:
        raise AmlError(f"an AML string cannot hold NUL: {text!r}")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(text: str) -> int:
    """The 32-bit compressed EISA ID of "PNP0A08" (§6.1.5 _HID; ASL EISAID()).

    Three uppercase letters, 5 bits each ('A' = 1), then four hex digits: 32 bits read most significant
    first, stored so the first letter's byte comes first in memory, i.e. byte-swapped as a little-endian
    DWORD. PNP0A08 -> bytes 41 D0 0A 08 -> 0x080AD041.
    """
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise AmlError(f"{text!r} is not an EISA ID (three letters A-Z, four hex digits)")
    vendor = 0
    for ch in text[:3]:
        vendor = vendor << 5 | (ord(ch) - 0x40)
    big_endian = vendor << 16 | int(text[3:], 16)
    return int.from_bytes(big_endian.to_bytes(4, "big"), "little")


# --- package length and the objects that carry one -------------------------------------------------


def pkg_length(body_length: int) -> bytes:
    """The PkgLength of a package whose content after the PkgLength is `body_length` bytes.

    The encoded length counts the PkgLength bytes themselves (§20.2.4 "PkgLength ... the length of the
    package including the PkgLength"), so the width is chosen first, then the value encoded.
    """
    if body_length < 0:
        raise AmlError(f"a package cannot be {body_length} bytes long")
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total <= ONE_BYTE_PKG_LENGTH_MAX:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            lead = extra << 6 | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"a package of {body_length} bytes exceeds the PkgLength maximum {MAX_PKG_LENGTH:#x}")


def _package_of(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


def name(path: str, value: bytes) -> bytes:
    """DefName: NameOp NameString DataRefObject (§20.2.5.1; ASL Name())."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, terms: Iterable[bytes]) -> bytes:
    """DefScope: ScopeOp PkgLength NameString TermList (§20.2.5.1; ASL Scope())."""
    return _package_of(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, terms: Iterable[bytes]) -> bytes:
    """DefDevice: DeviceOp PkgLength NameString TermList, DeviceOp = ExtOpPrefix 0x82 (§20.2.5.2)."""
    return _package_of(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def package(elements: Iterable[bytes]) -> bytes:
    """DefPackage: PackageOp PkgLength NumElements(byte) PackageElementList (§20.2.5.4)."""
    items = list(elements)
    if len(items) > 0xFF:
        raise AmlError(f"a Package holds at most 255 elements, not {len(items)} (use VarPackage)")
    return _package_of(bytes([PACKAGE_OP]), bytes([len(items)]) + b"".join(items))


def buffer(data: bytes) -> bytes:
    """DefBuffer: BufferOp PkgLength BufferSize(TermArg => Integer) ByteList (§20.2.5.4)."""
    return _package_of(bytes([BUFFER_OP]), integer(len(data)) + data)
