"""Resource descriptors for _CRS buffers (ACPI 6.5 §6.4, "Resource Data Types for ACPI").

    word_bus_number   Word Address Space Descriptor, resource type 2 (bus)   §6.4.3.5.3
    word_io           Word Address Space Descriptor, resource type 1 (I/O)   §6.4.3.5.3
    dword_memory      DWord Address Space Descriptor, type 0 (memory)        §6.4.3.5.2
    qword_memory      QWord Address Space Descriptor, type 0 (memory)        §6.4.3.5.1
    memory32_fixed    32-Bit Fixed Memory Range Descriptor                   §6.4.3.4
    io_port           I/O Port Descriptor (ASL IO(Decode16, ...))            §6.4.2.5
    interrupt         Extended Interrupt Descriptor (ASL Interrupt())        §6.4.3.6
    resource_template the descriptors and an End Tag (§6.4.2.9) in an AML Buffer (ASL ResourceTemplate())

Linux decodes these in drivers/acpi/resource.c (acpi_dev_resource_address_space ->
acpi_decode_space: a *producer* address descriptor becomes a host bridge window, IORESOURCE_WINDOW)
and, for the MCFG check, in arch/x86/pci/mmconfig-shared.c check_mcfg_resource (a Memory32Fixed, or an
address descriptor of memory type with a non-zero length, that contains the ECAM window).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from . import aml
from .checksum import checksum_byte

# Large resource items (§6.4.3): tag byte, u16 length of what follows.
MEMORY32_FIXED_TAG = 0x86
DWORD_ADDRESS_TAG = 0x87
WORD_ADDRESS_TAG = 0x88
QWORD_ADDRESS_TAG = 0x8A
EXTENDED_INTERRUPT_TAG = 0x89
# Small item End Tag (§6.4.2.9): type 0xF, length 1 -> 0x79, then a checksum byte.
END_TAG = 0x79
# Small item I/O Port Descriptor (§6.4.2.5): type 0x08, length 7 -> 0x47; information bit 0 = 16-bit decode.
IO_PORT_TAG = 0x47
IO_DECODE16 = 1 << 0
# Extended Interrupt Descriptor flags (§6.4.3.6, byte 3): bit 0 consumer, bit 1 edge (_HE), bit 2
# active-low (_LL), bit 3 shared (_SHR).
INTERRUPT_CONSUMER = 1 << 0
INTERRUPT_EDGE = 1 << 1

# Address space descriptors, Resource Type (byte 3).
RESOURCE_TYPE_MEMORY = 0
RESOURCE_TYPE_IO = 1
RESOURCE_TYPE_BUS = 2
# I/O Resource Flag (Resource Type = 1) Definitions, byte 5 (§6.4.3.5.5): bits 1:0 _RNG, 3 = entire range.
IO_ENTIRE_RANGE = 3
# General Flags (byte 4) of every address space descriptor: bit 3 _MAF, bit 2 _MIF, bit 1 _DEC, bit 0 "1: this device
# consumes this resource; 0: this device produces and consumes this resource".
FLAG_MAX_FIXED = 1 << 3
FLAG_MIN_FIXED = 1 << 2
FLAG_SUBTRACTIVE_DECODE = 1 << 1
FLAG_CONSUMER = 1 << 0
# Memory Resource Flag (Resource Type = 0) Definitions, byte 5 (§6.4.3.5.4): bits 2:1 _MEM (0 non-cacheable), bit 0 _RW.
MEM_READ_WRITE = 1 << 0
MEM_NON_CACHEABLE = 0 << 1
# 32-Bit Fixed Memory Range Descriptor, information byte 3: bit 0 _RW.
FIXED_READ_WRITE = 1 << 0

_WORD_ADDRESS = struct.Struct("<BHBBB5H")  # 16 bytes
_DWORD_ADDRESS = struct.Struct("<BHBBB5I")  # 26 bytes
_QWORD_ADDRESS = struct.Struct("<BHBBB5Q")  # 46 bytes
_MEMORY32_FIXED = struct.Struct("<BHBII")  # 12 bytes
_IO_PORT = struct.Struct("<BBHHBB")  # 8 bytes
_EXTENDED_INTERRUPT = struct.Struct("<BHBBI")  # 9 bytes, one interrupt


def _large(fmt: struct.Struct, tag: int, *fields: int) -> bytes:
    # The length field counts the bytes after itself: total - 3 (tag byte + u16 length).
    return fmt.pack(tag, fmt.size - 3, *fields)


def _range(what: str, first: int, last: int, limit: int) -> int:
    """The length of [first, last], checked to fit in a descriptor whose fields hold up to `limit`."""
    if not 0 <= first <= last <= limit:
        raise ValueError(f"{what} [{first:#x}, {last:#x}] is not a range within [0, {limit:#x}]")
    length = last - first + 1
    if length > limit:
        raise ValueError(
            f"{what} [{first:#x}, {last:#x}]: its length {length:#x} does not fit the descriptor"
        )
    return length


def word_bus_number(first: int, last: int) -> bytes:
    """ASL WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last, 0, count).

    acpi_pci_root_add() takes the host bridge's bus range from this descriptor ("[Firmware Bug]: no
    secondary bus range in _CRS" without it, and then it assumes [_BBN, 0xFF])."""
    length = _range("bus range", first, last, 0xFFFF)
    return _large(
        _WORD_ADDRESS,
        WORD_ADDRESS_TAG,
        RESOURCE_TYPE_BUS,
        FLAG_MAX_FIXED | FLAG_MIN_FIXED,
        0,  # no type-specific flags for a bus range
        0,  # granularity
        first,
        last,
        0,  # translation offset
        length,
    )


def word_io(first: int, last: int) -> bytes:
    """ASL WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, first, last, 0,
    length): a host bridge's I/O window."""
    length = _range("I/O range", first, last, 0xFFFF)
    return _large(
        _WORD_ADDRESS,
        WORD_ADDRESS_TAG,
        RESOURCE_TYPE_IO,
        FLAG_MAX_FIXED | FLAG_MIN_FIXED,
        IO_ENTIRE_RANGE,
        0,
        first,
        last,
        0,
        length,
    )


def dword_memory(first: int, last: int, *, producer: bool = True) -> bytes:
    """ASL DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0,
    first, last, 0, length): a 32-bit MMIO window."""
    length = _range("memory range", first, last, 0xFFFFFFFF)
    return _large(
        _DWORD_ADDRESS,
        DWORD_ADDRESS_TAG,
        RESOURCE_TYPE_MEMORY,
        FLAG_MAX_FIXED | FLAG_MIN_FIXED | (0 if producer else FLAG_CONSUMER),
        MEM_NON_CACHEABLE | MEM_READ_WRITE,
        0,
        first,
        last,
        0,
        length,
    )


def qword_memory(first: int, last: int, *, producer: bool = True) -> bytes:
    """ASL QWordMemory(..., NonCacheable, ReadWrite, 0, first, last, 0, length): a 64-bit range."""
    length = _range("memory range", first, last, aml.MAX_INTEGER)
    return _large(
        _QWORD_ADDRESS,
        QWORD_ADDRESS_TAG,
        RESOURCE_TYPE_MEMORY,
        FLAG_MAX_FIXED | FLAG_MIN_FIXED | (0 if producer else FLAG_CONSUMER),
        MEM_NON_CACHEABLE | MEM_READ_WRITE,
        0,
        first,
        last,
        0,
        length,
    )


def memory32_fixed(base: int, length: int) -> bytes:
    """ASL Memory32Fixed(ReadWrite, base, length): what check_mcfg_resource() reads first."""
    _range("fixed memory range", base, base + length - 1, 0xFFFFFFFF)
    return _large(_MEMORY32_FIXED, MEMORY32_FIXED_TAG, FIXED_READ_WRITE, base, length)


def io_port(base: int, length: int) -> bytes:
    """ASL IO (Decode16, base, base, 1, length): a fixed block of ports a device decodes."""
    _range("I/O port range", base, base + length - 1, 0xFFFF)
    return _IO_PORT.pack(IO_PORT_TAG, IO_DECODE16, base, base, 1, length)


def interrupt(gsi: int) -> bytes:
    """ASL Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }: an ISA-style edge line
    (Linux's pnpacpi hands it to acpi_register_gsi, which maps it through the IOAPIC)."""
    _range("GSI", gsi, gsi, 0xFFFFFFFF)
    fields = (INTERRUPT_CONSUMER | INTERRUPT_EDGE, 1, gsi)
    return _large(_EXTENDED_INTERRUPT, EXTENDED_INTERRUPT_TAG, *fields)


def end_tag(descriptors: bytes) -> bytes:
    """The End Tag for `descriptors` (§6.4.2.9): 0x79 and a checksum byte, here the one that makes all
    bytes of the template, end tag included, sum to zero (the Plug and Play ISA rule the tag comes from).
    The spec lets it be 0 ("the resource data is treated as if the checksum operation succeeded"): iasl
    writes 0, and neither ACPICA nor Linux checks it."""
    return bytes([END_TAG, checksum_byte(descriptors + bytes([END_TAG, 0]))])


def resource_template(descriptors: Iterable[bytes]) -> bytes:
    """ResourceTemplate() { descriptors }: a Buffer holding them and the End Tag."""
    data = b"".join(descriptors)
    return aml.buffer(data + end_tag(data))
