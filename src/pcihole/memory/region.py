"""Typed regions of the guest-physical map: what the guest sees at each address.

- `Ram`: read-write memory (a read-write memslot over anonymous host memory).
- `Rom`: read-only memory with fixed contents (a KVM_MEM_READONLY memslot; guest writes are dropped).
- `Hole`: an absent range: reads return the fill byte, writes change nothing (docs/design.md, "The
  hole contract"). How that is done is the strategy's business (memory/strategies/).
- `Mmio`: answered by the VMM in Python through a handler; no memslot, so every access exits.

Regions are frozen values: a `MemoryMap` is changed by building a new one, and two maps are diffed
by comparing regions. This layer knows nothing of PCI: a present PCI function's page is just an
`Mmio` region punched out of a `Hole`, which remembers the hole it replaced (`underlay`) so that
filling the page back restores exactly the original hole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from pcihole.memory.address import GuestRange

# discard: no exit where a coalesced zone can swallow the write; trap: every write exits to the trap
# handler; exit: every write exits and is discarded (no zone).
WritePolicy = Literal["discard", "trap", "exit"]
WRITE_POLICIES: tuple[WritePolicy, ...] = ("discard", "trap", "exit")

#: A hole's trap handler: called with (guest-physical address, the bytes written) for each write.
TrapHandler = Callable[[int, bytes], None]


@runtime_checkable
class MmioHandler(Protocol):
    """The VMM side of an `Mmio` region. Offsets are relative to the region's start."""

    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Region:
    range: GuestRange
    name: str = ""

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    def describe(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"{self.kind}{label} {self.range}"


@dataclass(frozen=True)
class Ram(Region):
    """Guest RAM. Must be page aligned (it becomes a memslot)."""

    def __post_init__(self) -> None:
        _require_pages(self)


@dataclass(frozen=True)
class Rom(Region):
    """Read-only memory initialised with `data` (zero-padded to the region's size)."""

    data: bytes = b""

    def __post_init__(self) -> None:
        _require_pages(self)
        if len(self.data) > self.range.size:
            raise ValueError(f"{self.describe()}: {len(self.data)} bytes of data do not fit")


@dataclass(frozen=True)
class Hole(Region):
    """An absent range: reads return `fill` bytes; writes are discarded or trapped (`on_write`)."""

    fill: int = 0xFF
    writes: WritePolicy = "discard"
    #: With writes="trap": called for every guest write in the hole (e.g. error reporting).
    on_write: TrapHandler | None = field(default=None, compare=True)

    def __post_init__(self) -> None:
        if not 0 <= self.fill <= 0xFF:
            raise ValueError(f"{self.describe()}: fill must be a byte, not {self.fill:#x}")
        if self.writes not in WRITE_POLICIES:
            raise ValueError(
                f"{self.describe()}: writes must be one of {WRITE_POLICIES}, not {self.writes!r}"
            )

    def same_hole(self, other: Region) -> bool:
        """True if `other` is a piece of the same hole (same fill, policy, handler and name)."""
        return isinstance(other, Hole) and (self.fill, self.writes, self.on_write, self.name) == (
            other.fill,
            other.writes,
            other.on_write,
            other.name,
        )


@dataclass(frozen=True, slots=True)
class MirrorPage:
    """A read-only image of an Mmio region's bytes that its handler keeps current: mapped by the
    VMM at `hva`, and page `offset` of the file `fd` (so a strategy can map it elsewhere too)."""

    hva: int
    fd: int
    offset: int


@dataclass(frozen=True)
class Mmio(Region):
    """Emulated by the VMM: every access exits and goes to `handler`, unless it has a mirror."""

    handler: MmioHandler | None = None
    #: A read-only image of the region's bytes, which the handler keeps current (e.g. a PCI
    #: function's config space, pci/config_mirror.py). Strategies that map memslots back the region
    #: with it (a KVM_MEM_READONLY slot over its hva, or its page mapped into the hole's arena):
    #: reads are served from it with no exit, writes still exit to `handler`. None: every access exits.
    mirror: MirrorPage | None = None
    #: The hole this region was punched out of, restored by MemoryMap.fill().
    underlay: Hole | None = None

    def __post_init__(self) -> None:
        if self.handler is None:
            raise ValueError(f"{self.describe()}: an Mmio region needs a handler")
        if self.mirror is not None:
            _require_pages(self)


def _require_pages(region: Region) -> None:
    if not region.range.is_page_aligned():
        raise ValueError(f"{region.describe()} is not page aligned (it must become a memslot)")


__all__ = [
    "Hole",
    "MirrorPage",
    "Mmio",
    "MmioHandler",
    "Ram",
    "Region",
    "Rom",
    "TrapHandler",
    "WRITE_POLICIES",
    "WritePolicy",
]
