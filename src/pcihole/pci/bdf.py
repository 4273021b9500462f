"""A function's address: segment (PCI domain), bus, device, function; written "0000:00:01.0" as lspci does."""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import ecam

MAX_SEGMENT = 0xFFFF  # MCFG's PCI Segment Group Number is a u16

# fullmatch, not "$": "$" also matches before a trailing newline.
_BDF_RE = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])")


@dataclass(frozen=True, slots=True, order=True)
class Bdf:
    """Ordered as lspci lists functions: by segment, bus, device, function."""

    segment: int
    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        for name, value, top in (
            ("segment", self.segment, MAX_SEGMENT),
            ("bus", self.bus, ecam.MAX_BUS),
            ("device", self.device, ecam.MAX_DEVICE),
            ("function", self.function, ecam.MAX_FUNCTION),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise ValueError(f"{name} {value!r} is outside 0..{top:#x}")

    @classmethod
    def parse(cls, text: str) -> Bdf:
        """Parse "SSSS:BB:DD.F" (all hexadecimal, as lspci -D prints); the segment part is required."""
        match = _BDF_RE.fullmatch(text)
        if match is None:
            shown = repr(text) if len(text) <= 40 else f"{text[:24]!r}... ({len(text)} characters)"
            raise ValueError(f"{shown} is not a BDF of the form SSSS:BB:DD.F (hexadecimal)")
        segment, bus, device, function = (int(part, 16) for part in match.groups())
        return cls(segment, bus, device, function)

    @classmethod
    def from_devfn(cls, segment: int, bus: int, devfn: int) -> Bdf:
        """From the 8-bit devfn (device << 3 | function) that Linux and the scan guest's report use."""
        return cls(segment, bus, devfn >> ecam.FUNCTION_BITS, devfn & ecam.FUNCTION_MASK)

    @property
    def devfn(self) -> int:
        return (self.device << ecam.FUNCTION_BITS) | self.function

    @property
    def ecam_offset(self) -> int:
        """Offset of this function's 4 KiB page from its segment's bus-0 ECAM address."""
        return ecam.function_page_offset(self.bus, self.device, self.function)

    def with_function(self, function: int) -> Bdf:
        return Bdf(self.segment, self.bus, self.device, function)

    def __str__(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"
