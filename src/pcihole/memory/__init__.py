"""The guest-physical memory map: addresses, typed regions, the map, hole strategies, slot planning.

The machine layer uses:
- `MemoryMap([Ram(...), Hole(...), ...])` to describe the guest, `GuestMemory(hv, vm, strategy)`
  and `.update(map)` to put it in force;
- `.punch_page(gpa, handler)` / `.fill_page(gpa)` as functions come and go;
- its `.view` (a `MapView`) for what reaches the VMM: `.read` / `.write` for MMIO exits in the map,
  `.coalesced(entries)` for the coalesced-ring entries drained at every exit;
- `.stats()` for the numbers.
This layer knows no PCI: a hole is a range with a fill and a write policy.
"""

from __future__ import annotations

from pcihole.memory.accounting import ExitCounters, MemoryStats
from pcihole.memory.address import PAGE_SIZE, AddressOverflow, GuestAddress, GuestRange, gpa, page_range
from pcihole.memory.guest_memory import GuestMemory, MemoryUpdateError
from pcihole.memory.map_view import MapView
from pcihole.memory.memory_map import MemoryMap, MemoryMapError, OverlapError
from pcihole.memory.region import Hole, MirrorPage, Mmio, MmioHandler, Ram, Region, Rom
from pcihole.memory.slot_planner import PlanError
from pcihole.memory.strategies import (
    DEFAULT_TUNING,
    STRATEGY_NAMES,
    HoleTuning,
    StrategyUnavailable,
    available_strategies,
    make_strategy,
    resolve_strategy,
)

__all__ = [
    "DEFAULT_TUNING",
    "PAGE_SIZE",
    "STRATEGY_NAMES",
    "AddressOverflow",
    "ExitCounters",
    "GuestAddress",
    "GuestMemory",
    "GuestRange",
    "Hole",
    "HoleTuning",
    "MapView",
    "MemoryMap",
    "MemoryMapError",
    "MemoryStats",
    "MemoryUpdateError",
    "MirrorPage",
    "Mmio",
    "MmioHandler",
    "OverlapError",
    "PlanError",
    "Ram",
    "Region",
    "Rom",
    "StrategyUnavailable",
    "available_strategies",
    "gpa",
    "make_strategy",
    "page_range",
    "resolve_strategy",
]
