"""A tiny AML encoder: the few ACPI Machine Language terms a static DSDT needs (ACPI 6.5 §20.2).

Every function returns the bytes of one term; terms compose by concatenation. What is here:

    names       name_seg, name_string            §20.2.2 Name Objects Encoding
    integers    integer (ZeroOp/OneOp/OnesOp, BytePrefix .. QWordPrefix)   §20.2.3 Data Objects Encoding
    lengths     pkg_length                       §20.2.4 Package Length Encoding
    objects     name, scope, device, package, buffer, string          §20.2.5 Term Objects Encoding
    ids         eisa_id                          §6.1.5 _HID ("EISA type ID ... compressed")
    methods     method, if_, else_, return_, store, and_, or_, lequal, lnot, create_dword_field,
                arg, local, to_uuid              §20.2.5.2-4 (the few a host bridge's _OSC uses)

Resource descriptors for _CRS buffers are in resources.py. ACPICA's interpreter (what Linux runs,
drivers/acpi/acpica/) decodes exactly these encodings; the tests decode them again independently and
have the real `iasl -d` disassemble the DSDT built from them.
"""

from __future__ import annotations

import re
import struct
import uuid
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
METHOD_OP = 0x14
CREATE_DWORD_FIELD_OP = 0x8A
# §20.2.5.3 Statement Opcodes Encoding.
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4
# §20.2.5.4 Expression Opcodes Encoding.
STORE_OP = 0x70
AND_OP = 0x7B
OR_OP = 0x7D
LNOT_OP = 0x92
LEQUAL_OP = 0x93
# §20.2.6.1-2 Arg Objects and Local Objects Encoding.
LOCAL0_OP = 0x60
ARG0_OP = 0x68
MAX_LOCAL = 7
MAX_ARG = 6
#: §20.2.5.2 MethodFlags: bit 0-2 ArgCount, bit 3 SerializeFlag (0 NotSerialized), bit 4-7 SyncLevel.
METHOD_SERIALIZED = 1 << 3
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


# --- methods ---------------------------------------------------------------------------------------
#
# Operands below are already-encoded terms (integer(...), arg(0), local(0), name_string("CDW1"), ...),
# so a method body reads like its ASL.


def method(path: str, arg_count: int, terms: Iterable[bytes], *, serialized: bool = False) -> bytes:
    """DefMethod: MethodOp PkgLength NameString MethodFlags TermList (§20.2.5.2; ASL Method())."""
    if not 0 <= arg_count <= MAX_ARG + 1:
        raise AmlError(f"a method takes 0 to {MAX_ARG + 1} arguments, not {arg_count}")
    flags = arg_count | (METHOD_SERIALIZED if serialized else 0)
    return _package_of(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def arg(n: int) -> bytes:
    """ArgObj: Arg0Op (0x68) .. Arg6Op (0x6E)."""
    if not 0 <= n <= MAX_ARG:
        raise AmlError(f"Arg{n} does not exist (Arg0-Arg{MAX_ARG})")
    return bytes([ARG0_OP + n])


def local(n: int) -> bytes:
    """LocalObj: Local0Op (0x60) .. Local7Op (0x67)."""
    if not 0 <= n <= MAX_LOCAL:
        raise AmlError(f"Local{n} does not exist (Local0-Local{MAX_LOCAL})")
    return bytes([LOCAL0_OP + n])


def create_dword_field(source: bytes, byte_index: bytes, field: str) -> bytes:
    """DefCreateDWordField: CreateDWordFieldOp SourceBuff ByteIndex NameString (§20.2.5.2)."""
    return bytes([CREATE_DWORD_FIELD_OP]) + source + byte_index + name_string(field)


def if_(predicate: bytes, terms: Iterable[bytes]) -> bytes:
    """DefIfElse's If part: IfOp PkgLength Predicate TermList (§20.2.5.3)."""
    return _package_of(bytes([IF_OP]), predicate + b"".join(terms))


def else_(terms: Iterable[bytes]) -> bytes:
    """DefElse: ElseOp PkgLength TermList; it must follow an if_() directly (§20.2.5.3)."""
    return _package_of(bytes([ELSE_OP]), b"".join(terms))


def return_(value: bytes) -> bytes:
    """DefReturn: ReturnOp ArgObject (§20.2.5.3)."""
    return bytes([RETURN_OP]) + value


def store(value: bytes, target: bytes) -> bytes:
    """DefStore: StoreOp TermArg SuperName (§20.2.5.4; ASL Store(value, target), `target = value`)."""
    return bytes([STORE_OP]) + value + target


def and_(left: bytes, right: bytes, target: bytes) -> bytes:
    """DefAnd: AndOp Operand Operand Target (§20.2.5.4; ASL And(), `target = left & right`)."""
    return bytes([AND_OP]) + left + right + target


def or_(left: bytes, right: bytes, target: bytes) -> bytes:
    """DefOr: OrOp Operand Operand Target (§20.2.5.4; ASL Or(), `target = left | right`)."""
    return bytes([OR_OP]) + left + right + target


def lequal(left: bytes, right: bytes) -> bytes:
    """DefLEqual: LequalOp Operand Operand (§20.2.5.4; ASL `left == right`)."""
    return bytes([LEQUAL_OP]) + left + right


def lnot(operand: bytes) -> bytes:
    """DefLNot: LnotOp Operand (§20.2.5.4); LNot(LEqual(a, b)) is how iasl encodes `a != b`."""
    return bytes([LNOT_OP]) + operand


def to_uuid(text: str) -> bytes:
    """ASL ToUUID("33DB4D5B-1FF7-401C-9657-7441C03DD766"): a 16-byte Buffer, the first three groups
    little-endian and the last two as written (§19.6.142), which is uuid.UUID(...).bytes_le."""
    try:
        value = uuid.UUID(text)
    except ValueError as e:
        raise AmlError(f"{text!r} is not a UUID") from e
    return buffer(value.bytes_le)
