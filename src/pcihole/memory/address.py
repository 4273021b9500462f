"""Guest-physical addresses and ranges, as values (vm-memory's GuestAddress / GuestRegion idea).

A range stores its *inclusive* last byte, so [0xffff_ffff_ffff_f000, 0xffff_ffff_ffff_ffff] is
representable: an exclusive end would be 2**64, which no u64 field can hold. Arithmetic that could
leave the 64-bit guest-physical space is checked and raises `AddressOverflow` instead of wrapping,
the way kvm_set_memory_region() refuses a `guest_phys_addr + memory_size` that wraps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering

from pcihole.host.mman import PAGE_SIZE

ADDRESS_BITS = 64
ADDRESS_LIMIT = 1 << ADDRESS_BITS  # one past the last guest-physical byte
LAST_ADDRESS = ADDRESS_LIMIT - 1


class AddressOverflow(ArithmeticError):
    """An address computation left [0, 2**64)."""


@total_ordering
@dataclass(frozen=True, slots=True)
class GuestAddress:
    """A guest-physical address: an integer in [0, 2**64). Usable wherever an int is (`__index__`)."""

    value: int

    def __post_init__(self) -> None:
        if not isinstance(self.value, int) or isinstance(self.value, bool):
            raise TypeError(f"guest address must be an int, not {type(self.value).__name__}")
        if not 0 <= self.value < ADDRESS_LIMIT:
            raise AddressOverflow(f"{self.value:#x} is not a 64-bit guest-physical address")

    def __index__(self) -> int:
        return self.value

    def __int__(self) -> int:
        return self.value

    def __lt__(self, other: object) -> bool:
        if isinstance(other, GuestAddress):
            return self.value < other.value
        return NotImplemented

    def checked_add(self, offset: int) -> GuestAddress:
        """self + offset; AddressOverflow past 2**64 - 1 (or below 0 for a negative offset)."""
        result = self.value + offset
        if not 0 <= result < ADDRESS_LIMIT:
            raise AddressOverflow(f"{self} + {offset:#x} leaves the 64-bit address space")
        return GuestAddress(result)

    def checked_sub(self, offset: int) -> GuestAddress:
        return self.checked_add(-offset)

    def offset_from(self, base: GuestAddress | int) -> int:
        """self - base, which must not be negative."""
        diff = self.value - int(base)
        if diff < 0:
            raise AddressOverflow(f"{self} is below {int(base):#x}")
        return diff

    def align_down(self, alignment: int) -> GuestAddress:
        _check_alignment(alignment)
        return GuestAddress(self.value & ~(alignment - 1))

    def align_up(self, alignment: int) -> GuestAddress:
        """Round up; AddressOverflow if that passes 2**64 - 1."""
        _check_alignment(alignment)
        return GuestAddress(0).checked_add((self.value + alignment - 1) & ~(alignment - 1))

    def is_aligned(self, alignment: int) -> bool:
        _check_alignment(alignment)
        return self.value & (alignment - 1) == 0

    def __str__(self) -> str:
        return f"{self.value:#x}"

    def __repr__(self) -> str:
        return f"GuestAddress({self.value:#x})"


def _check_alignment(alignment: int) -> None:
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, not {alignment}")


def gpa(value: GuestAddress | int) -> GuestAddress:
    """Coerce an int (or a GuestAddress) to a GuestAddress."""
    return value if isinstance(value, GuestAddress) else GuestAddress(value)


@dataclass(frozen=True, slots=True, order=True)
class GuestRange:
    """[start, last], both inclusive; never empty. Ordered by start, then last."""

    start: GuestAddress
    last: GuestAddress

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", gpa(self.start))
        object.__setattr__(self, "last", gpa(self.last))
        if self.last < self.start:
            raise ValueError(f"empty range: last {self.last} is below start {self.start}")

    @classmethod
    def from_size(cls, start: GuestAddress | int, size: int) -> GuestRange:
        """[start, start + size - 1]; AddressOverflow if the last byte is past 2**64 - 1."""
        if size <= 0:
            raise ValueError(f"a range needs a positive size, not {size}")
        start = gpa(start)
        return cls(start, start.checked_add(size - 1))

    @classmethod
    def from_bounds(cls, start: GuestAddress | int, end: int) -> GuestRange:
        """[start, end) with an exclusive `end` that may be 2**64."""
        return cls.from_size(start, end - int(start))

    @property
    def size(self) -> int:
        """Number of bytes; up to 2**64 (a Python int, so no overflow here)."""
        return self.last.value - self.start.value + 1

    @property
    def end(self) -> int:
        """One past the last byte, as a plain int (may be 2**64, which is not an address)."""
        return self.last.value + 1

    def contains(self, addr: GuestAddress | int) -> bool:
        return self.start.value <= int(addr) <= self.last.value

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int | GuestAddress) and self.contains(addr)

    def covers(self, other: GuestRange) -> bool:
        return self.start <= other.start and other.last <= self.last

    def overlaps(self, other: GuestRange) -> bool:
        return self.start <= other.last and other.start <= self.last

    def adjacent_to(self, other: GuestRange) -> bool:
        """True if `other` starts right after self, or ends right before it."""
        return self.end == other.start.value or other.end == self.start.value

    def intersection(self, other: GuestRange) -> GuestRange | None:
        if not self.overlaps(other):
            return None
        return GuestRange(max(self.start, other.start), min(self.last, other.last))

    def subtract(self, other: GuestRange) -> list[GuestRange]:
        """The parts of self outside `other` (0, 1 or 2 ranges, in address order)."""
        if not self.overlaps(other):
            return [self]
        parts = []
        if self.start < other.start:
            parts.append(GuestRange(self.start, other.start.checked_sub(1)))
        if other.last < self.last:
            parts.append(GuestRange(other.last.checked_add(1), self.last))
        return parts

    def is_page_aligned(self) -> bool:
        return self.start.is_aligned(PAGE_SIZE) and self.size % PAGE_SIZE == 0

    def page_interior(self) -> GuestRange | None:
        """The largest page-aligned range inside self, or None if it holds no whole page."""
        start = self.start.value + (-self.start.value) % PAGE_SIZE
        end = self.end & ~(PAGE_SIZE - 1)
        return GuestRange.from_bounds(start, end) if end > start else None

    def split(self, max_size: int) -> list[GuestRange]:
        """Consecutive pieces of at most max_size bytes covering self."""
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, not {max_size}")
        return [
            GuestRange.from_size(s, min(max_size, self.end - s))
            for s in range(self.start.value, self.end, max_size)
        ]

    def __str__(self) -> str:
        return f"[{self.start.value:#x}, {self.last.value:#x}]"

    def __repr__(self) -> str:
        return f"GuestRange({self})"


def page_range(addr: GuestAddress | int) -> GuestRange:
    """The 4 KiB page containing addr."""
    return GuestRange.from_size(gpa(addr).align_down(PAGE_SIZE), PAGE_SIZE)


def align_up(value: int, alignment: int) -> int:
    """`value` rounded up to a multiple of `alignment`, a positive integer: the sizes and offsets of
    PCI windows and ACPI tables, unbounded (GuestAddress.align_up is the one checked against the
    64-bit space)."""
    if alignment <= 0:
        raise ValueError(f"alignment must be positive, not {alignment}")
    return (value + alignment - 1) // alignment * alignment


__all__ = [
    "ADDRESS_LIMIT",
    "AddressOverflow",
    "GuestAddress",
    "GuestRange",
    "LAST_ADDRESS",
    "PAGE_SIZE",
    "align_up",
    "gpa",
    "page_range",
]
