"""Hole runs -> memslots, within KVM_CAP_NR_MEMSLOTS and the host's vm.max_map_count. Pure.

The ro-alias strategy backs every hole slot with one *arena* per fill value: a PROT_NONE host
reservation tiled with side-by-side MAP_SHARED|MAP_FIXED, PROT_READ mappings of one small sealed
memfd of fill bytes (the *alias*). A memslot only needs `userspace_addr .. + memory_size` to be
readable memory; it does not care that the pages repeat. So one slot covers a whole run of hole,
however long, with only `alias size` bytes of host memory behind it (measured on a real KVM:
4096 mappings of a 64 KiB memfd = one 256 MiB slot, no exits). And since every byte of an arena is
the same, all hole slots of a fill share the *same* arena at the same address (KVM allows any
number of slots over one host range): the arena is as large as the largest run, not their sum.

Two host limits bound this:
- Memslots: KVM_CAP_NR_MEMSLOTS (32764 on x86) minus the slots RAM/ROM already use. One slot per run
  (a run longer than the arena, or than KVM_MEM_MAX_NR_PAGES pages, is split).
- Mappings: each alias mapping is one VMA. Adjacent MAP_SHARED mappings of the same file at the same
  file offset are *not* merged (vma_merge needs contiguous pgoff), so an arena of A bytes with an
  alias of a bytes costs A / a VMAs, and a process may own at most vm.max_map_count (65530 here)
  VMAs in all: Python, its libraries and guest RAM need a few hundred, the other fill values' arenas
  need theirs. The planner is given a *budget* of mappings (by default a quarter of the headroom under
  max_map_count, at most 16384: see `default_map_budget`), split evenly between the fill values,
  and stays under it by growing the alias: 64 KiB, then 128 KiB, ... up to 2 MiB (a larger alias
  means fewer mappings for the same arena, at the cost of more fill bytes). If even the largest
  alias cannot make the arena as large as a run, the run is split into several slots, each no longer
  than the arena.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pcihole.memory.address import PAGE_SIZE, GuestRange

# Include/linux/kvm_host.h: KVM_MEM_MAX_NR_PAGES ((1UL << 31) - 1), checked for user slots in
# kvm_set_memory_region (docs/kvm-memslot-rules.md, "KVM_SET_USER_MEMORY_REGION").
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
MAX_SLOT_BYTES = KVM_MEM_MAX_NR_PAGES * PAGE_SIZE
# The alias sizes: start small (64 KiB of backing per fill value), grow by doubling up to 2 MiB.
# Why 64 KiB (`pcihole bench` sweeps 4 KiB .. 2 MiB, bench/alias_sweep.py): it is the kernel's
# fault-around window (mm/memory.c, fault_around_bytes), so an unpopulated arena takes one host fault
# per alias mapping, as few as any size gives (4 KiB and 16 KiB aliases take one per probed page:
# 8,069 and 8,068 faults on a full scan against 4,048); below 64 KiB a 256 MiB hole also needs more
# mappings than the budget, hence more memslots. With the arena prefaulted (HoleTuning) no size
# faults, and a larger alias only saves mappings (build time) for more backing: 2 MiB is 128x less
# than ro-filled where 64 KiB is 4,096x less.
ALIAS_MIN = 64 * 1024
ALIAS_MAX = 2 * 1024 * 1024
# Never plan more than this many alias mappings, whatever max_map_count allows.
MAP_BUDGET_CAP = 16384


class PlanError(RuntimeError):
    """The holes cannot be covered within the limits; the message says which limit and by how much."""


@dataclass(frozen=True, slots=True)
class SlotPlan:
    """One memslot to create over a hole: `range` (page aligned), filled with `fill`."""

    range: GuestRange
    fill: int


@dataclass(frozen=True, slots=True)
class AliasSpec:
    """The arena of one fill value: `arena_size` bytes made of `mappings` mappings of `alias_size`."""

    fill: int
    alias_size: int
    arena_size: int

    @property
    def mappings(self) -> int:
        return self.arena_size // self.alias_size


@dataclass(frozen=True, slots=True)
class AliasPlan:
    slots: tuple[SlotPlan, ...]
    aliases: tuple[AliasSpec, ...]

    @property
    def mappings(self) -> int:
        return sum(a.mappings for a in self.aliases)

    def alias_for(self, fill: int) -> AliasSpec:
        for a in self.aliases:
            if a.fill == fill:
                return a
        raise KeyError(f"no alias for fill {fill:#x}")


def default_map_budget(max_map_count: int, maps_in_use: int) -> int:
    """A quarter of the VMA headroom, capped at MAP_BUDGET_CAP: leave room for the rest of the VMM."""
    return max(0, min(MAP_BUDGET_CAP, (max_map_count - maps_in_use) // 4))


def merge_runs(runs: Iterable[tuple[GuestRange, int]]) -> list[tuple[GuestRange, int]]:
    """Sort, and merge address-adjacent runs with the same fill. Overlapping runs are an error."""
    out: list[tuple[GuestRange, int]] = []
    for rng, fill in sorted(runs, key=lambda r: r[0]):
        if not rng.is_page_aligned():
            raise PlanError(f"hole run {rng} is not page aligned")
        if out and out[-1][0].overlaps(rng):
            raise PlanError(f"hole runs {out[-1][0]} and {rng} overlap")
        if out and out[-1][1] == fill and out[-1][0].end == rng.start.value:
            out[-1] = (GuestRange(out[-1][0].start, rng.last), fill)
        else:
            out.append((rng, fill))
    return out


def plan_plain_slots(
    runs: Iterable[tuple[GuestRange, int]], *, free_slots: int, max_slot_bytes: int = MAX_SLOT_BYTES
) -> tuple[SlotPlan, ...]:
    """One slot per run (split at max_slot_bytes), for backings as large as the run (ro-filled, native)."""
    max_slot = max_slot_bytes // PAGE_SIZE * PAGE_SIZE
    slots = tuple(SlotPlan(piece, fill) for rng, fill in merge_runs(runs) for piece in rng.split(max_slot))
    _check_slot_count(len(slots), free_slots)
    return slots


def plan_alias(
    runs: Iterable[tuple[GuestRange, int]],
    *,
    free_slots: int,
    map_budget: int,
    alias_min: int = ALIAS_MIN,
    alias_max: int = ALIAS_MAX,
    max_slot_bytes: int = MAX_SLOT_BYTES,
) -> AliasPlan:
    """Cover every run with read-only slots over shared arenas (see the module docstring)."""
    if alias_min % PAGE_SIZE or alias_min <= 0 or alias_max < alias_min:
        raise ValueError(f"bad alias sizes {alias_min:#x}..{alias_max:#x}")
    merged = merge_runs(runs)
    fills = sorted({fill for _, fill in merged})
    if not fills:
        return AliasPlan((), ())
    per_fill = map_budget // len(fills)
    if per_fill < 1:
        raise PlanError(
            f"a budget of {map_budget} host mappings cannot hold one alias for each of {len(fills)} fill values "
            "(vm.max_map_count is too low)"
        )
    aliases = {
        f: _alias_for(
            max(r.size for r, g in merged if g == f), f, per_fill, alias_min, alias_max, max_slot_bytes
        )
        for f in fills
    }
    slots = tuple(
        SlotPlan(piece, fill) for rng, fill in merged for piece in rng.split(aliases[fill].arena_size)
    )
    _check_slot_count(len(slots), free_slots)
    return AliasPlan(slots, tuple(aliases[f] for f in fills))


def _alias_for(
    longest: int, fill: int, budget: int, alias_min: int, alias_max: int, max_slot: int
) -> AliasSpec:
    alias = alias_min
    while -(-longest // alias) > budget and alias * 2 <= alias_max:
        alias *= 2
    arena = min(-(-longest // alias) * alias, budget * alias, max_slot // alias * alias)
    if arena <= 0:
        raise PlanError(f"an alias of {alias:#x} bytes does not fit in one memslot")
    return AliasSpec(fill, alias, arena)


def _check_slot_count(needed: int, free_slots: int) -> None:
    if needed > free_slots:
        raise PlanError(
            f"the holes need {needed} memslots but only {free_slots} are free (KVM_CAP_NR_MEMSLOTS); "
            "use fewer, larger holes or the exit strategy"
        )


def covered_bytes(slots: Sequence[SlotPlan]) -> int:
    return sum(s.range.size for s in slots)


__all__ = [
    "ALIAS_MAX",
    "ALIAS_MIN",
    "AliasPlan",
    "AliasSpec",
    "KVM_MEM_MAX_NR_PAGES",
    "MAP_BUDGET_CAP",
    "MAX_SLOT_BYTES",
    "PlanError",
    "SlotPlan",
    "covered_bytes",
    "default_map_budget",
    "merge_runs",
    "plan_alias",
    "plan_plain_slots",
]
