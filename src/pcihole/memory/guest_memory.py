"""`GuestMemory`: a VM's memory map in force, changed by diff-and-swap, and the exits it answers.

Changing the map (`update`, `change`, `punch_page`, `fill_page`):
1. build the new `MemoryMap` (validated: no overlaps) and its kernel objects: RAM/ROM slots over
   their host backing, and the hole strategy's `HoleLayout` (slots, coalesced zones, fill devices);
2. diff against the objects in force and apply only the difference, journaling each operation;
3. on success, swap the new map in (exits are answered from it from then on) and free the backing
   nothing uses any more; on any failure, undo the journal in reverse, so the old map stays in force
   with exactly its old slots, and no slot id or backing leaks.

Operation order, and why no guest read in a hole can see anything but fill bytes or a function's
bytes while it runs. KVM slots cannot overlap (a CREATE over an existing slot fails with EEXIST,
kvm_check_memslot_overlap), and a slot cannot shrink (changing npages is EINVAL), so replacing the
256 MiB slot over a hole by the two slots around a punched page needs a DELETE first: for the few
microseconds until the new slots exist, the rest of the hole has no slot. (During a DELETE KVM even
installs an INVALID copy first, so accesses see MMIO then too: research/kvm-memslot-rules.md §1.20.)
A guest read there simply exits, and **every exit in a hole range is answered from the map in
force, i.e. from the current function table: all-ones for a hole page, the function's handler for a
punched page. A transient slot gap is therefore invisible to the guest; it only costs exits.** To
keep the gap short we order the operations:
- zones and fill devices that go away are removed first (so a page about to become a function never
  has its writes swallowed by a hole's zone; a write that exits meanwhile is judged by the old map,
  where the page is still hole);
- new slots that overlap no slot being deleted are created *before* any deletion (no gap at all for
  them), then the deletions, then the remaining creations, largest first;
- new zones and fill devices last; then the swap.
Ring entries are judged as hole writes by address against every zone we ever registered, so a
write coalesced while a page was hole is never delivered to the function punched there later.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pcihole.host.mman import PROT_READ, HostMapping, mprotect_raw
from pcihole.hv.exits import CoalescedWrite, MmioRead, MmioWrite, VcpuExit
from pcihole.hv.uapi import KvmCap, KvmMemFlag
from pcihole.memory.accounting import ExitCounters, MemoryStats, process_mappings, vm_pte_bytes
from pcihole.memory.address import GuestAddress, GuestRange, page_range
from pcihole.memory.memory_map import MemoryMap
from pcihole.memory.region import Hole, Mmio, MmioHandler, Ram, Region, Rom
from pcihole.memory.slot_allocator import SlotAllocator
from pcihole.memory.strategies import HoleStrategy, make_strategy
from pcihole.memory.strategies.base import FillSpec, HoleLayout, SlotSpec

if TYPE_CHECKING:
    from pcihole.hv.interface import Hypervisor, Vcpu, Vm

#: How many trapped writes to keep for holes with writes="trap" and no on_write handler.
TRAPPED_WRITES_KEPT = 4096


class MemoryUpdateError(RuntimeError):
    """A map change failed; the previous map is still in force. `__cause__` is the original error."""


@dataclass(frozen=True)
class _Applied:
    map: MemoryMap
    slots: dict[SlotSpec, int]  # what is in the kernel: spec -> slot id
    layout: HoleLayout = field(default_factory=HoleLayout)


@dataclass(frozen=True)
class _Op:
    kind: str  # create | delete | zone | unzone | fill | unfill
    item: SlotSpec | GuestRange | FillSpec
    slot: int = -1

    def describe(self) -> str:
        slot = f" slot {self.slot}" if self.slot >= 0 else ""
        return f"{self.kind}{slot} {self.item}"


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
        self.counters = ExitCounters()
        #: (addr, data) of trapped hole writes whose hole has no on_write handler.
        self.trapped: deque[tuple[int, bytes]] = deque(maxlen=TRAPPED_WRITES_KEPT)
        self._backings: dict[Region, HostMapping] = {}
        self._applied = _Applied(MemoryMap(), {})
        self._zone_history: list[GuestRange] = []  # merged, sorted
        self._zone_starts: list[int] = []
        self._lock = threading.Lock()

    # --- the map in force ----------------------------------------------------------------------------

    @property
    def memory_map(self) -> MemoryMap:
        return self._applied.map

    @property
    def slot_table(self) -> dict[int, SlotSpec]:
        """Slot id -> what the kernel has for it."""
        return {i: s for s, i in self._applied.slots.items()}

    @property
    def layout(self) -> HoleLayout:
        return self._applied.layout

    def update(self, new_map: MemoryMap) -> None:
        """Make `new_map` the map in force (see the module docstring); MemoryUpdateError on failure."""
        with self._lock:
            self._apply(new_map)

    def change(self, edit: Callable[[MemoryMap], MemoryMap]) -> MemoryMap:
        """Apply edit(map in force) atomically with respect to other changes; returns the new map."""
        with self._lock:
            new_map = edit(self._applied.map)
            self._apply(new_map)
            return new_map

    def punch(self, rng: GuestRange, handler: MmioHandler, name: str = "") -> None:
        """Carve rng (e.g. a present function's config page) out of its hole; the VMM answers it."""
        self.change(lambda m: m.punch(rng, handler, name))

    def punch_page(self, addr: GuestAddress | int, handler: MmioHandler, name: str = "") -> None:
        self.punch(page_range(addr), handler, name)

    def fill(self, rng: GuestRange) -> None:
        """Give a punched range back to its hole."""
        self.change(lambda m: m.fill(rng))

    def fill_page(self, addr: GuestAddress | int) -> None:
        self.fill(page_range(addr))

    # --- applying a change ---------------------------------------------------------------------------

    def _apply(self, new_map: MemoryMap) -> None:
        old = self._applied
        new_backings: list[Region] = []
        try:
            static = [self._memory_slot(r, new_backings) for r in new_map if isinstance(r, Ram | Rom)]
            layout = self.strategy.layout(new_map.holes(), self.slots.limit - len(static))
        except BaseException:
            self._drop_backings(new_backings)
            self.strategy.collect(old.slots)
            raise
        wanted = [*static, *layout.slots]
        journal: list[_Op] = []
        try:
            slots = self._apply_ops(old, wanted, layout, journal)
        except BaseException as e:
            undo_errors = self._undo(journal)
            self._drop_backings(new_backings)
            self.strategy.collect(old.slots)
            done = "; ".join(op.describe() for op in journal) or "nothing"
            msg = f"memory map change failed ({e}); undid: {done}; the previous map is still in force"
            if undo_errors:
                msg += f"; UNDO FAILED: {'; '.join(undo_errors)}"
            raise MemoryUpdateError(msg) from e
        for op in journal:
            if op.kind == "delete":
                self.slots.release(op.slot)
        self._record_zones(layout.zones)
        self._applied = _Applied(new_map, slots, layout)  # the swap: exits now see new_map
        self.strategy.collect(slots)
        in_map = set(new_map)
        self._drop_backings([r for r in self._backings if r not in in_map])

    def _apply_ops(
        self, old: _Applied, wanted: Sequence[SlotSpec], layout: HoleLayout, journal: list[_Op]
    ) -> dict[SlotSpec, int]:
        vm = self.vm
        old_layout = old.layout
        wanted_set = set(wanted)
        delete = [(s, i) for s, i in old.slots.items() if s not in wanted_set]
        create = sorted((s for s in wanted if s not in old.slots), key=lambda s: -s.size)
        slots = {s: i for s, i in old.slots.items() if s in wanted_set}

        for zone in sorted(set(old_layout.zones) - set(layout.zones)):
            vm.unregister_coalesced_mmio(zone.start.value, zone.size)
            journal.append(_Op("unzone", zone))
        for f in sorted(set(old_layout.fills) - set(layout.fills), key=lambda f: f.range):
            vm.unregister_mmio_fill(f.range.start.value, f.range.size)
            journal.append(_Op("unfill", f))

        def create_slot(spec: SlotSpec) -> None:
            slot = self.slots.allocate()
            try:
                vm.set_user_memory_region(slot, spec.flags, spec.gpa, spec.size, spec.hva)
            except BaseException:
                self.slots.release(slot)
                raise
            journal.append(_Op("create", spec, slot))
            slots[spec] = slot

        deferred = []
        for spec in create:
            if self.slots.free > 0 and not any(spec.range.overlaps(d.range) for d, _ in delete):
                create_slot(spec)  # no gap: nothing has to go first
            else:
                deferred.append(spec)
        for spec, slot in delete:
            vm.set_user_memory_region(slot, spec.flags, spec.gpa, 0, spec.hva)
            journal.append(_Op("delete", spec, slot))
        for spec in deferred:
            # The ids of the slots just deleted are released only at commit (the undo re-creates
            # them under the same id), so count them as free here.
            if self.slots.free == 0:
                self._release_deleted(journal)
            create_slot(spec)

        for f in sorted(set(layout.fills) - set(old_layout.fills), key=lambda f: f.range):
            vm.register_mmio_fill(f.range.start.value, f.range.size, f.fill, f.flags)
            journal.append(_Op("fill", f))
        for zone in sorted(set(layout.zones) - set(old_layout.zones)):
            vm.register_coalesced_mmio(zone.start.value, zone.size)
            journal.append(_Op("zone", zone))
        return slots

    def _release_deleted(self, journal: list[_Op]) -> None:
        """Hand the ids of slots deleted in this change back to the allocator early (marking the
        journal so that the undo takes a fresh id instead)."""
        for k, op in enumerate(journal):
            if op.kind == "delete" and op.slot >= 0:
                self.slots.release(op.slot)
                journal[k] = replace(op, kind="delete-released")

    def _undo(self, journal: list[_Op]) -> list[str]:
        errors = []
        vm = self.vm
        for op in reversed(journal):
            try:
                if op.kind == "create":
                    s = op.item
                    assert isinstance(s, SlotSpec)
                    vm.set_user_memory_region(op.slot, s.flags, s.gpa, 0, s.hva)
                    self.slots.release(op.slot)
                elif op.kind in ("delete", "delete-released"):
                    s = op.item
                    assert isinstance(s, SlotSpec)
                    slot = op.slot if op.kind == "delete" else self.slots.allocate()
                    vm.set_user_memory_region(slot, s.flags, s.gpa, s.size, s.hva)
                    if op.kind == "delete-released":
                        self._applied.slots[s] = slot
                elif op.kind == "zone":
                    r = op.item
                    assert isinstance(r, GuestRange)
                    vm.unregister_coalesced_mmio(r.start.value, r.size)
                elif op.kind == "unzone":
                    r = op.item
                    assert isinstance(r, GuestRange)
                    vm.register_coalesced_mmio(r.start.value, r.size)
                elif op.kind == "fill":
                    f = op.item
                    assert isinstance(f, FillSpec)
                    vm.unregister_mmio_fill(f.range.start.value, f.range.size)
                elif op.kind == "unfill":
                    f = op.item
                    assert isinstance(f, FillSpec)
                    vm.register_mmio_fill(f.range.start.value, f.range.size, f.fill, f.flags)
            except OSError as e:
                errors.append(f"undo {op.describe()}: {e}")
        return errors

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

    def _drop_backings(self, regions: Iterable[Region]) -> None:
        for r in list(regions):
            m = self._backings.pop(r, None)
            if m is not None:
                m.close()

    def _record_zones(self, zones: Iterable[GuestRange]) -> None:
        merged = sorted([*self._zone_history, *zones])
        out: list[GuestRange] = []
        for r in merged:
            if out and r.start.value <= out[-1].end:
                out[-1] = GuestRange(out[-1].start, max(out[-1].last, r.last))
            else:
                out.append(r)
        self._zone_history = out
        self._zone_starts = [r.start.value for r in out]

    def _in_zone_history(self, addr: int) -> bool:
        i = bisect.bisect_right(self._zone_starts, addr) - 1
        return i >= 0 and addr <= self._zone_history[i].last.value

    # --- guest memory access (loading code, reading results) -----------------------------------------

    def _backing_at(self, addr: int, size: int) -> tuple[HostMapping, int]:
        r = self._applied.map.region_at(addr)
        if not isinstance(r, Ram | Rom) or not r.range.contains(addr + size - 1):
            raise ValueError(f"[{addr:#x}, +{size:#x}) is not inside one RAM/ROM region")
        return self._backings[r], addr - r.range.start.value

    def write_guest(self, addr: int, data: bytes) -> None:
        """Write guest RAM from the host (loading a guest image, tables, ...)."""
        m, off = self._backing_at(addr, len(data))
        if m.prot & 2 == 0:
            raise ValueError(f"{addr:#x} is ROM")
        m.write(off, data)

    def read_guest(self, addr: int, size: int) -> bytes:
        m, off = self._backing_at(addr, size)
        return m.read(off, size)

    # --- exits -----------------------------------------------------------------------------------------

    def handle_mmio_read(self, addr: int, size: int) -> bytes | None:
        """Answer a guest read that exited (KVM_EXIT_MMIO) from the map in force.

        Holes answer their fill, Mmio regions their handler, RAM/ROM their backing (only reachable
        while a slot is being replaced). An access spanning regions gets each byte from its own
        region (hole contract point 3). None if some byte is in no region: the caller decides.
        """
        m = self._applied.map  # one read of the reference: the whole answer comes from one map
        r = m.region_at(addr)
        if r is not None and addr + size - 1 <= r.range.last.value:
            return self._read(r, addr, size)
        out = bytearray()
        pos, end = addr, addr + size
        while pos < end:
            r = m.region_at(pos)
            if r is None:
                self.counters.unclaimed += 1
                return None
            n = min(end, r.range.end) - pos
            out += self._read(r, pos, n)
            pos += n
        return bytes(out)

    def _read(self, r: Region, addr: int, size: int) -> bytes:
        if isinstance(r, Hole):
            self.counters.hole_reads += 1
            return bytes([r.fill]) * size
        if isinstance(r, Mmio):
            self.counters.mmio_reads += 1
            assert r.handler is not None
            data = r.handler.read(addr - r.range.start.value, size)
            if len(data) != size:
                raise ValueError(f"{r.describe()}: handler returned {len(data)} bytes for a {size}-byte read")
            return data
        self.counters.memory_reads += 1
        return self._backings[r].read(addr - r.range.start.value, size)

    def handle_mmio_write(self, addr: int, data: bytes) -> bool:
        """Handle a guest write that exited, from the map in force. False if some byte is in no region."""
        m = self._applied.map
        pieces = []
        pos, end = addr, addr + len(data)
        while pos < end:
            r = m.region_at(pos)
            if r is None:
                self.counters.unclaimed += 1
                return False
            n = min(end, r.range.end) - pos
            pieces.append((r, pos, data[pos - addr : pos - addr + n]))
            pos += n
        for r, a, d in pieces:
            self._write(r, a, d)
        return True

    def _write(self, r: Region, addr: int, data: bytes) -> None:
        if isinstance(r, Hole):
            if r.writes == "trap":
                self._trap(r, addr, data)
            else:
                self.counters.hole_writes_discarded += 1
        elif isinstance(r, Mmio):
            self.counters.mmio_writes += 1
            assert r.handler is not None
            r.handler.write(addr - r.range.start.value, data)
        else:
            self.counters.memory_writes += 1
            if isinstance(r, Ram):
                self._backings[r].write(addr - r.range.start.value, data)
            # ROM: writes are dropped, as the hardware does.

    def _trap(self, hole: Hole, addr: int, data: bytes) -> None:
        self.counters.hole_writes_trapped += 1
        if hole.on_write is not None:
            hole.on_write(addr, data)
        else:
            self.trapped.append((addr, data))

    def handle_coalesced(self, writes: Iterable[CoalescedWrite]) -> list[CoalescedWrite]:
        """Take the drained ring entries that are hole writes; return the others, in order.

        An entry is a hole write if it lies in a zone this map ever registered (zones exist only over
        discard-holes). It is counted, and handed to the trap handler only if the hole there has
        since become writes="trap"; it is never delivered to a region punched there later.
        """
        rest = []
        for w in writes:
            if w.pio or not self._in_zone_history(w.addr):
                rest.append(w)
                continue
            r = self._applied.map.region_at(w.addr)
            if isinstance(r, Hole) and r.writes == "trap":
                self._trap(r, w.addr, w.data)
            else:
                self.counters.hole_writes_coalesced += 1
        return rest

    def drain(self, vcpu: Vcpu) -> list[CoalescedWrite]:
        """Drain the vCPU's coalesced ring (call at *every* exit); returns the entries not ours."""
        return self.handle_coalesced(vcpu.drain_coalesced_mmio())

    def handle_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        """Answer an MmioRead/MmioWrite that falls in the map; False if it is not ours."""
        if isinstance(exit_, MmioRead):
            data = self.handle_mmio_read(exit_.addr, exit_.size)
            if data is None:
                return False
            vcpu.complete_read(data)
            return True
        if isinstance(exit_, MmioWrite):
            return self.handle_mmio_write(exit_.addr, exit_.data)
        return False

    # --- stats and teardown ----------------------------------------------------------------------------

    def stats(self) -> MemoryStats:
        layout = self._applied.layout
        return MemoryStats(
            strategy=self.strategy.name,
            memslots=len(self._applied.slots),
            hole_memslots=len(layout.slots),
            hole_backing_bytes=self.strategy.backing_bytes(),
            hole_mappings=self.strategy.host_mappings(),
            process_mappings=process_mappings(),
            vm_pte_bytes=vm_pte_bytes(),
            coalesced_zones=len(layout.zones),
            fill_devices=len(layout.fills),
            exits=replace(self.counters),
        )

    def close(self) -> None:
        """Delete our slots and zones (if the VM is still open) and free all host backing."""
        with self._lock:
            # If the VM is already closed the ioctls fail: its slots went with it.
            with contextlib.suppress(MemoryUpdateError, OSError):
                self._apply(MemoryMap())
            self._applied = _Applied(MemoryMap(), {})
            self._drop_backings(list(self._backings))
            self.strategy.close()


__all__ = ["GuestMemory", "MemoryUpdateError"]
