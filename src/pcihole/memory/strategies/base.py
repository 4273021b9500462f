"""What every hole strategy produces: a `HoleLayout` of memslots, coalesced zones and fill devices.

A strategy turns the holes of a map into kernel objects, and owns the host memory behind them. It
never issues ioctls itself: `GuestMemory.update()` diffs the layout of the new map against the
one in force and applies only the difference, so that unchanged slots stay in place while a page is
punched (memory/layout_change.py). Backing is allocated by `layout()` and released by `collect()`,
which frees whatever the layout in force no longer references (after a successful swap, or after a
failed one, when the layout in force is still the old one).

Whatever part of a hole the layout does not cover (no slot, no fill device: the `exit` strategy,
the partial pages at the edges of a hole that is not page aligned, a transient gap while slots are
replaced) exits to the VMM, which answers from the map in force: `MapView.read` (map_view.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from pcihole.hv.uapi import KvmCap
from pcihole.memory.address import GuestRange
from pcihole.memory.region import Hole, Mmio

if TYPE_CHECKING:
    from pcihole.hv.interface import Hypervisor, Vm

# struct kvm_coalesced_mmio_zone { __u64 addr; __u32 size; __u32 pio; }: a zone is at most
# 2**32 - 1 bytes. Zones are cut at 2 GiB so that each piece stays page aligned.
ZONE_MAX_BYTES = 1 << 31
# include/linux/kvm_host.h: NR_IOBUS_DEVS 1000 devices per bus (KVM_MMIO_BUS), shared by coalesced
# zones and in-kernel MMIO devices; more -> ENOSPC. Hole zones take at most this many, leaving the
# rest to the machine. Past it, discard-holes simply exit on writes (still correct, just slower).
ZONE_BUDGET = 512


@dataclass(frozen=True, slots=True)
class HoleTuning:
    """How a strategy backs its holes on the host; `pcihole bench` sweeps both knobs.

    `prefault`: populate the host page tables of the hole backing when it is mapped (ro-alias,
    ro-filled; HostMapping.populate_read). Measured on the software-KVM hosts pcihole is benched on:
    without it, a full scan of a 256-bus hole takes one host page fault per 64 KiB (the kernel's
    fault-around window, fault_around_bytes), 4,096 faults and about a fifth of the scan's time; with
    it, none, for about 15 ms of mapping time per 256 MiB (the page tables a full probe would build
    anyway: VmPTE is the same). Off, the pages fault in on first touch.

    `alias_granule`: the size of ro-alias's fill memfd (one alias mapping), fixed; None lets the
    planner choose (memory/slot_planner.py: 64 KiB, larger only under the mapping budget).
    """

    prefault: bool = True
    alias_granule: int | None = None


#: The tuning every strategy gets unless told otherwise.
DEFAULT_TUNING = HoleTuning()


class StrategyUnavailable(RuntimeError):
    """The backend cannot express the strategy; the message names what is missing."""


@dataclass(frozen=True, slots=True)
class SlotSpec:
    """One memslot: the arguments of KVM_SET_USER_MEMORY_REGION except the slot id."""

    range: GuestRange
    flags: int
    hva: int

    @property
    def gpa(self) -> int:
        return self.range.start.value

    @property
    def size(self) -> int:
        return self.range.size


@dataclass(frozen=True, slots=True)
class FillSpec:
    """One in-kernel MMIO fill device (the model's register_mmio_fill)."""

    range: GuestRange
    fill: int
    flags: int


@dataclass(frozen=True, slots=True)
class PageAlias:
    """A mirrored page mapped into a hole slot's host memory: the 4 KiB at `hva` (inside the slot's
    arena, standing for guest page `gpa`) is page `offset` of `fd` instead of page `under_offset`
    of the fill memfd `under_fd`. Changing it is one mmap(MAP_FIXED), no memslot: KVM follows the
    new host page through its MMU notifier (the old one is zapped before mmap returns), the model
    through Unicorn's host pointer to the same virtual address."""

    gpa: int
    hva: int
    fd: int
    offset: int
    under_fd: int
    under_offset: int


@dataclass(frozen=True)
class HoleLayout:
    slots: tuple[SlotSpec, ...] = ()
    zones: tuple[GuestRange, ...] = ()
    fills: tuple[FillSpec, ...] = ()
    #: Mirrored pages inside the hole slots (strategies with `remaps_mirrors`).
    pages: tuple[PageAlias, ...] = ()
    #: Holes (or parts) whose discard-writes exit because the zone budget ran out.
    zoneless: tuple[GuestRange, ...] = field(default=())


class HoleStrategy(ABC):
    """Base of the strategies. Subclasses set `name` and implement `layout()`."""

    name: ClassVar[str]
    #: Reads of absent pages never exit (where the layout covers them).
    reads_exit: ClassVar[bool] = False
    #: Mmio regions with a mirror get a read-only slot over it (their reads do not exit). Every
    #: strategy that maps memslots does; `exit` does not, so that every access exits, as in QEMU.
    maps_mirrors: ClassVar[bool] = True
    #: The strategy covers mirrored pages itself, inside its hole slots (`layout(mirrored=...)`),
    #: so that a page turning into a function's mirror and back changes no memslot.
    remaps_mirrors: ClassVar[bool] = False

    def __init__(
        self,
        hypervisor: Hypervisor,
        vm: Vm,
        *,
        map_budget: int | None = None,
        tuning: HoleTuning = DEFAULT_TUNING,
    ) -> None:
        self.hypervisor = hypervisor
        self.vm = vm
        self.map_budget = map_budget
        self.tuning = tuning
        self.coalesced = bool(vm.check_extension(KvmCap.KVM_CAP_COALESCED_MMIO))

    @classmethod
    def missing(cls, hypervisor: Hypervisor, vm: Vm) -> str | None:
        """None if the backend can do this strategy, else a sentence naming what is missing."""
        return None

    @classmethod
    def cannot_do(cls, holes: Sequence[Hole]) -> str | None:
        """None if this strategy can implement these holes (once `missing()` is None), else why not."""
        return None

    @abstractmethod
    def layout(self, holes: Sequence[Hole], free_slots: int, mirrored: Sequence[Mmio] = ()) -> HoleLayout:
        """The kernel objects for these holes; allocates any backing they need. `mirrored` (only
        given to strategies with `remaps_mirrors`): punched pages with a mirror, to cover too."""

    def collect(self, live: Iterable[SlotSpec]) -> None:  # noqa: B027 - most strategies own no backing
        """Free the backing no slot in `live` uses."""

    def backing_bytes(self) -> int:
        """Distinct host bytes behind the holes (see memory/accounting.py)."""
        return 0

    def host_mappings(self) -> int:
        """Host mappings (VMAs) this strategy owns."""
        return 0

    def close(self) -> None:
        self.collect(())

    # --- helpers shared by the strategies ------------------------------------------------------------

    def write_zones(self, holes: Sequence[Hole]) -> tuple[tuple[GuestRange, ...], tuple[GuestRange, ...]]:
        """Coalesced zones over the discard-holes (so their writes do not exit), and what did not fit.

        Trap-holes get no zone: each of their writes must exit as an MmioWrite for the trap handler.
        """
        if not self.coalesced:
            return (), tuple(h.range for h in holes if h.writes == "discard")
        zones: list[GuestRange] = []
        for rng in merge_adjacent(h.range for h in holes if h.writes == "discard"):
            zones.extend(rng.split(ZONE_MAX_BYTES))
        return tuple(zones[:ZONE_BUDGET]), tuple(zones[ZONE_BUDGET:])


def merge_adjacent(ranges: Iterable[GuestRange]) -> list[GuestRange]:
    out: list[GuestRange] = []
    for r in sorted(ranges):
        if out and out[-1].end == r.start.value:
            out[-1] = GuestRange(out[-1].start, r.last)
        else:
            out.append(r)
    return out


def fill_runs(holes: Sequence[Hole]) -> list[tuple[GuestRange, int]]:
    """Page-aligned runs of hole to cover with slots: adjacent holes of one fill merged, then the
    whole pages inside (partial pages at unaligned edges are left to exits)."""
    merged: list[tuple[GuestRange, int]] = []
    for h in sorted(holes, key=lambda h: h.range):
        if merged and merged[-1][1] == h.fill and merged[-1][0].end == h.range.start.value:
            merged[-1] = (GuestRange(merged[-1][0].start, h.range.last), h.fill)
        else:
            merged.append((h.range, h.fill))
    out = []
    for rng, fill in merged:
        inner = rng.page_interior()
        if inner is not None:
            out.append((inner, fill))
    return out


__all__ = [
    "DEFAULT_TUNING",
    "FillSpec",
    "HoleLayout",
    "HoleStrategy",
    "HoleTuning",
    "PageAlias",
    "SlotSpec",
    "StrategyUnavailable",
    "ZONE_BUDGET",
    "ZONE_MAX_BYTES",
    "fill_runs",
    "merge_adjacent",
]
