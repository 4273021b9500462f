"""`GuestMemory`: a VM's memory map, changed by diff-and-swap; its view answers the exits.

Changing the map (`update`, `punch_page`, `fill_page`):
1. build the new `MemoryMap` (validated: no overlaps) and its kernel objects: RAM/ROM slots over
   their host backing, and the hole strategy's `HoleLayout` (slots, coalesced zones, fill devices);
2. apply only the difference to the kernel (layout_change.py: typed operations, journaled);
3. on success, swap a new `MapInForce` into the view (exits are answered from it from then on) and
   free the backing nothing uses any more; on any failure, undo the journal in reverse, so the old
   map stays in force with exactly its old slots, and no slot id or backing leaks.

Answering (`view`, map_view.py) never changes the layout: the machine's ECAM windows hand it the
MMIO exits in a hole's range, the run loop the coalesced-ring entries drained at every exit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from pcihole.host.mman import PROT_READ, HostMapping, mprotect_raw
from pcihole.hv.uapi import KvmCap, KvmMemFlag
from pcihole.memory.accounting import MemoryStats, process_mappings, vm_pte_bytes
from pcihole.memory.address import GuestAddress, page_range
from pcihole.memory.layout_change import LayoutChange
from pcihole.memory.map_view import MapInForce, MapView
from pcihole.memory.memory_map import MemoryMap
from pcihole.memory.region import MirrorPage, Mmio, MmioHandler, Ram, Region, Rom
from pcihole.memory.slot_allocator import SlotAllocator
from pcihole.memory.strategies import HoleStrategy, make_strategy
from pcihole.memory.strategies.base import SlotSpec

if TYPE_CHECKING:
    from pcihole.hv.interface import Hypervisor, Vm


class MemoryUpdateError(RuntimeError):
    """A map change failed; the previous map is still in force. `__cause__` is the original error."""


class GuestMemory:
    """The memory of one VM on one backend with one hole strategy."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        vm: Vm,
        strategy: str | HoleStrategy = "auto",
        *,
        nr_memslots: int | None = None,
        map_budget: int | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        self.vm = vm
        self.strategy = (
            strategy
            if isinstance(strategy, HoleStrategy)
            else make_strategy(strategy, hypervisor, vm, map_budget=map_budget)
        )
        limit = vm.check_extension(KvmCap.KVM_CAP_NR_MEMSLOTS)
        self.slots = SlotAllocator(min(limit, nr_memslots) if nr_memslots else limit)
        #: Answers exits and ring entries from the map in force.
        self.view = MapView()
        self._backings: dict[Region, HostMapping] = {}
        self._lock = threading.Lock()

    # --- the map in force ----------------------------------------------------------------------------

    @property
    def memory_map(self) -> MemoryMap:
        return self.view.in_force.map

    @property
    def slot_table(self) -> dict[int, SlotSpec]:
        """Slot id -> what the kernel has for it."""
        return {i: s for s, i in self.view.in_force.slots.items()}

    def update(self, new_map: MemoryMap) -> None:
        """Make `new_map` the map in force (see the module docstring); MemoryUpdateError on failure."""
        with self._lock:
            self._apply(new_map)

    def _change(self, edit: Callable[[MemoryMap], MemoryMap]) -> None:
        """Apply edit(map in force) atomically with respect to other changes."""
        with self._lock:
            self._apply(edit(self.view.in_force.map))

    def punch_page(
        self, addr: GuestAddress | int, handler: MmioHandler, name: str = "", mirror: MirrorPage | None = None
    ) -> None:
        """Carve the page at addr (e.g. a present function's config page) out of its hole; the VMM
        answers it through `handler` (reads from `mirror`, where the strategy maps one)."""
        self._change(lambda m: m.punch(page_range(addr), handler, name, mirror))

    def fill_page(self, addr: GuestAddress | int) -> None:
        """Give a punched page back to its hole."""
        self._change(lambda m: m.fill(page_range(addr)))

    # --- applying a change ---------------------------------------------------------------------------

    def _apply(self, new_map: MemoryMap) -> None:
        old = self.view.in_force
        new_backings: list[Region] = []
        try:
            static = [self._memory_slot(r, new_backings) for r in new_map if isinstance(r, Ram | Rom)]
            mirrored = [r for r in new_map if isinstance(r, Mmio) and r.mirror is not None]
            if not self.strategy.maps_mirrors:
                mirrored = []
            if self.strategy.remaps_mirrors:
                layout = self.strategy.layout(new_map.holes(), self.slots.limit - len(static), mirrored)
                remapped = {p.gpa for p in layout.pages}
                # Mirrored pages the strategy did not take (not punched from a hole) get slots.
                static += [self._mirror_slot(r) for r in mirrored if r.range.start.value not in remapped]
            else:
                static += [self._mirror_slot(r) for r in mirrored]
                layout = self.strategy.layout(new_map.holes(), self.slots.limit - len(static))
        except BaseException:
            self._drop_backings(new_backings)
            self.strategy.collect(old.slots)
            raise
        change = LayoutChange(self.vm, self.slots, old.slots, old.layout)
        try:
            slots = change.apply([*static, *layout.slots], layout)
        except BaseException as e:
            restored, undo_errors = change.undo()
            if restored != old.slots:  # an old slot came back under a new id
                self.view.in_force = replace(old, slots=restored)
            self._drop_backings(new_backings)
            self.strategy.collect(restored)
            msg = f"memory map change failed ({e}); undid: {change.describe()}; the previous map is still in force"
            if undo_errors:
                msg += f"; UNDO FAILED: {'; '.join(undo_errors)}"
            raise MemoryUpdateError(msg) from e
        change.commit()
        backings: dict[Region, HostMapping] = {
            r: self._backings[r] for r in new_map if isinstance(r, Ram | Rom)
        }
        # The swap: exits are answered from new_map from here on.
        self.view.in_force = MapInForce(
            new_map, slots, layout, backings, old.zones_ever.with_zones(layout.zones)
        )
        self.strategy.collect(slots)
        self._drop_backings([r for r in self._backings if r not in backings])

    def _memory_slot(self, region: Ram | Rom, created: list[Region]) -> SlotSpec:
        backing = self._backings.get(region)
        if backing is None:
            backing = HostMapping.anonymous(region.range.size, name=region.describe())
            self._backings[region] = backing
            created.append(region)
            if isinstance(region, Rom):
                backing.write(0, region.data)
                # The VMM cannot scribble on ROM by accident either.
                mprotect_raw(backing.addr, backing.size, PROT_READ)
        flags = int(KvmMemFlag.KVM_MEM_READONLY) if isinstance(region, Rom) else 0
        return SlotSpec(region.range, flags, backing.addr)

    @staticmethod
    def _mirror_slot(region: Mmio) -> SlotSpec:
        """A read-only slot over the region's mirror: reads never exit, writes exit to its handler
        (no coalesced zone ever covers an Mmio region: zones are made over holes only, so a write
        to a mirrored page is never swallowed by the ring and read back stale)."""
        assert region.mirror is not None
        return SlotSpec(region.range, int(KvmMemFlag.KVM_MEM_READONLY), region.mirror.hva)

    def _drop_backings(self, regions: Iterable[Region]) -> None:
        for r in list(regions):
            m = self._backings.pop(r, None)
            if m is not None:
                m.close()

    # --- guest memory access from the host (loading code, reading results) -----------------------------

    def write_guest(self, addr: int, data: bytes) -> None:
        """Write guest RAM from the host (loading a guest image, tables, ...)."""
        m, off = self.view.in_force.backing_at(addr, len(data))
        if m.prot & 2 == 0:
            raise ValueError(f"{addr:#x} is ROM")
        m.write(off, data)

    def read_guest(self, addr: int, size: int) -> bytes:
        m, off = self.view.in_force.backing_at(addr, size)
        return m.read(off, size)

    # --- stats and teardown ----------------------------------------------------------------------------

    def stats(self) -> MemoryStats:
        now = self.view.in_force
        return MemoryStats(
            strategy=self.strategy.name,
            memslots=len(now.slots),
            hole_memslots=len(now.layout.slots),
            hole_backing_bytes=self.strategy.backing_bytes(),
            hole_mappings=self.strategy.host_mappings(),
            process_mappings=process_mappings(),
            vm_pte_bytes=vm_pte_bytes(),
            coalesced_zones=len(now.layout.zones),
            fill_devices=len(now.layout.fills),
            exits=replace(self.view.counters),
        )

    def close(self) -> None:
        """Delete our slots and zones (if the VM is still open) and free all host backing."""
        with self._lock:
            # If the VM is already closed the ioctls fail: its slots went with it.
            with contextlib.suppress(MemoryUpdateError, OSError):
                self._apply(MemoryMap())
            self.view.in_force = MapInForce(zones_ever=self.view.in_force.zones_ever)
            self._drop_backings(list(self._backings))
            self.strategy.close()


__all__ = ["GuestMemory", "MemoryUpdateError"]
