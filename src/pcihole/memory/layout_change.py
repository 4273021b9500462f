"""A change of the kernel objects behind the memory map: diff -> typed operations -> commit or undo.

`LayoutChange.apply()` compares the kernel objects the new map needs (memslots, coalesced zones, MMIO
fill devices) with those in force and issues only the difference, one typed operation at a time,
each journaled as it succeeds. On success `commit()` hands the ids of deleted slots back to the
allocator; on failure `undo()` reverses the journal, so the kernel holds exactly the old objects
again. It is QEMU's memory_region_transaction_commit -> kvm_region_add / kvm_region_del, with an
undo that QEMU does not have (QEMU aborts on a failed memslot change).

Operation order, and why no guest read in a hole can see anything but fill bytes or a function's
bytes while it runs. KVM slots cannot overlap (a CREATE over an existing slot fails with EEXIST,
kvm_check_memslot_overlap), and a slot cannot shrink (changing npages is EINVAL), so replacing the
256 MiB slot over a hole by the two slots around a punched page needs a DELETE first: for the few
microseconds until the new slots exist, the rest of the hole has no slot. (During the DELETE itself
x86 KVM makes a vCPU that touches the old slot retry until the delete is done, after which the access
exits as MMIO: docs/kvm-memslot-rules.md, "Memslot changes while a vCPU runs".) A guest read there
simply exits, and every exit is answered from the map in force (map_view.py): a transient slot gap
is invisible to the guest; it only costs exits. To keep the gap short the operations go:
- zones and fill devices that go away first (so a page about to become a function never has its
  writes swallowed by a hole's zone; a write that exits meanwhile is judged by the old map, where
  the page is still hole);
- new slots that overlap no slot being deleted are created *before* any deletion (no gap at all for
  them), then the deletions, then the remaining creations, largest first;
- new zones and fill devices last.
Mirrored pages inside hole slots (PageAlias, strategies with `remaps_mirrors`) are host mappings,
not kernel objects: a page leaving goes back to fill bytes right after the zones go, a page
arriving is mapped after the slots exist. Either way it is one mmap(MAP_FIXED) over a page whose
bytes are the fill on both sides (the host bridge blanks a mirror page before it is announced and
after its function left), so a read during the swap sees fill bytes whichever page it hits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pcihole.host.mman import MAP_FIXED, MAP_SHARED, PAGE_SIZE, PROT_READ, mmap_raw
from pcihole.memory.address import GuestRange
from pcihole.memory.slot_allocator import SlotAllocator
from pcihole.memory.strategies.base import FillSpec, HoleLayout, PageAlias, SlotSpec

if TYPE_CHECKING:
    from pcihole.hv.interface import Vm


@dataclass(frozen=True)
class CreateSlot:
    """KVM_SET_USER_MEMORY_REGION creating `spec` under the id `slot`."""

    spec: SlotSpec
    slot: int


@dataclass(frozen=True)
class DeleteSlot:
    """KVM_SET_USER_MEMORY_REGION with size 0: `spec`, in force under `slot`, goes."""

    spec: SlotSpec
    slot: int
    #: The id went back to the allocator before the commit (the change ran out of ids); undoing
    #: this deletion takes a fresh id.
    id_released: bool = False


@dataclass(frozen=True)
class AddZone:
    """KVM_REGISTER_COALESCED_MMIO."""

    range: GuestRange


@dataclass(frozen=True)
class RemoveZone:
    """KVM_UNREGISTER_COALESCED_MMIO."""

    range: GuestRange


@dataclass(frozen=True)
class AddFill:
    """The model's KVM_REGISTER_MMIO_FILL (the proposed fill device)."""

    spec: FillSpec


@dataclass(frozen=True)
class RemoveFill:
    """The model's KVM_UNREGISTER_MMIO_FILL."""

    spec: FillSpec


@dataclass(frozen=True)
class MapPage:
    """mmap(MAP_FIXED) of a mirrored page over its place in a hole slot's arena."""

    page: PageAlias


@dataclass(frozen=True)
class UnmapPage:
    """mmap(MAP_FIXED) of the fill memfd back over a mirrored page's place."""

    page: PageAlias


LayoutOp = CreateSlot | DeleteSlot | AddZone | RemoveZone | AddFill | RemoveFill | MapPage | UnmapPage


def _map_page(hva: int, fd: int, offset: int) -> None:
    mmap_raw(hva, PAGE_SIZE, PROT_READ, MAP_SHARED | MAP_FIXED, fd, offset)


def describe(op: LayoutOp) -> str:
    """As the error of a failed change lists what it undid: "delete slot 3 ...", "unzone [...]"."""
    match op:
        case CreateSlot(spec, slot):
            return f"create slot {slot} {spec}"
        case DeleteSlot(spec, slot, id_released):
            return f"{'delete-released' if id_released else 'delete'} slot {slot} {spec}"
        case AddZone(rng):
            return f"zone {rng}"
        case RemoveZone(rng):
            return f"unzone {rng}"
        case AddFill(f):
            return f"fill {f}"
        case RemoveFill(f):
            return f"unfill {f}"
        case MapPage(p):
            return f"map page {p.gpa:#x}"
        case UnmapPage(p):
            return f"unmap page {p.gpa:#x}"


class LayoutChange:
    """One change from the kernel objects in force (`old_slots`, `old_layout`) to new ones."""

    def __init__(
        self, vm: Vm, ids: SlotAllocator, old_slots: Mapping[SlotSpec, int], old_layout: HoleLayout
    ) -> None:
        self.vm = vm
        self.ids = ids
        self.old_slots = old_slots
        self.old_layout = old_layout
        #: The operations done so far, in order.
        self.journal: list[LayoutOp] = []

    def apply(self, wanted: Sequence[SlotSpec], layout: HoleLayout) -> dict[SlotSpec, int]:
        """Issue the difference (in the order the module docstring gives); the new spec -> slot id."""
        old, old_layout = self.old_slots, self.old_layout
        wanted_set = set(wanted)
        delete = [(s, i) for s, i in old.items() if s not in wanted_set]
        create = sorted((s for s in wanted if s not in old), key=lambda s: -s.size)
        slots = {s: i for s, i in old.items() if s in wanted_set}

        for zone in sorted(set(old_layout.zones) - set(layout.zones)):
            self._do(RemoveZone(zone))
        for f in sorted(set(old_layout.fills) - set(layout.fills), key=lambda f: f.range):
            self._do(RemoveFill(f))
        for page in sorted(set(old_layout.pages) - set(layout.pages), key=lambda p: p.gpa):
            if any(p.hva == page.hva for p in layout.pages):
                continue  # the same place gets another page below
            self._do(UnmapPage(page))
        deferred = []
        for spec in create:
            if self.ids.free > 0 and not any(spec.range.overlaps(d.range) for d, _ in delete):
                slots[spec] = self._create(spec)  # no gap: nothing has to go first
            else:
                deferred.append(spec)
        for spec, slot in delete:
            self._do(DeleteSlot(spec, slot))
        for spec in deferred:
            # The ids of the slots just deleted are released only at commit (the undo re-creates
            # them under the same id), so count them as free here.
            if self.ids.free == 0:
                self._release_deleted_ids()
            slots[spec] = self._create(spec)
        for page in sorted(set(layout.pages) - set(old_layout.pages), key=lambda p: p.gpa):
            self._do(MapPage(page))
        for f in sorted(set(layout.fills) - set(old_layout.fills), key=lambda f: f.range):
            self._do(AddFill(f))
        for zone in sorted(set(layout.zones) - set(old_layout.zones)):
            self._do(AddZone(zone))
        return slots

    def commit(self) -> None:
        """The change stands: the ids of the deleted slots are free again."""
        for op in self.journal:
            if isinstance(op, DeleteSlot) and not op.id_released:
                self.ids.release(op.slot)

    def undo(self) -> tuple[dict[SlotSpec, int], list[str]]:
        """Reverse the journal. Returns the slot ids in force again (an old slot whose id was
        released mid-change comes back under a fresh one) and what could not be undone."""
        slots = dict(self.old_slots)
        errors = []
        for op in reversed(self.journal):
            try:
                restored = self._reverse(op)
            except OSError as e:
                errors.append(f"undo {describe(op)}: {e}")
                continue
            if restored is not None:
                slots[restored[0]] = restored[1]
        return slots, errors

    def describe(self) -> str:
        return "; ".join(describe(op) for op in self.journal) or "nothing"

    # --- the operations ----------------------------------------------------------------------------

    def _create(self, spec: SlotSpec) -> int:
        slot = self.ids.allocate()
        try:
            self._do(CreateSlot(spec, slot))
        except BaseException:
            self.ids.release(slot)
            raise
        return slot

    def _do(self, op: LayoutOp) -> None:
        vm = self.vm
        match op:
            case CreateSlot(spec, slot):
                vm.set_user_memory_region(slot, spec.flags, spec.gpa, spec.size, spec.hva)
            case DeleteSlot(spec, slot):
                vm.set_user_memory_region(slot, spec.flags, spec.gpa, 0, spec.hva)
            case AddZone(rng):
                vm.register_coalesced_mmio(rng.start.value, rng.size)
            case RemoveZone(rng):
                vm.unregister_coalesced_mmio(rng.start.value, rng.size)
            case AddFill(f):
                vm.register_mmio_fill(f.range.start.value, f.range.size, f.fill, f.flags)
            case RemoveFill(f):
                vm.unregister_mmio_fill(f.range.start.value, f.range.size)
            case MapPage(p):
                _map_page(p.hva, p.fd, p.offset)
            case UnmapPage(p):
                _map_page(p.hva, p.under_fd, p.under_offset)
        self.journal.append(op)

    def _reverse(self, op: LayoutOp) -> tuple[SlotSpec, int] | None:
        vm = self.vm
        match op:
            case CreateSlot(spec, slot):
                vm.set_user_memory_region(slot, spec.flags, spec.gpa, 0, spec.hva)
                self.ids.release(slot)
            case DeleteSlot(spec, slot, id_released):
                if id_released:
                    slot = self.ids.allocate()
                vm.set_user_memory_region(slot, spec.flags, spec.gpa, spec.size, spec.hva)
                return spec, slot
            case AddZone(rng):
                vm.unregister_coalesced_mmio(rng.start.value, rng.size)
            case RemoveZone(rng):
                vm.register_coalesced_mmio(rng.start.value, rng.size)
            case AddFill(f):
                vm.unregister_mmio_fill(f.range.start.value, f.range.size)
            case RemoveFill(f):
                vm.register_mmio_fill(f.range.start.value, f.range.size, f.fill, f.flags)
            case MapPage(p):
                _map_page(p.hva, p.under_fd, p.under_offset)
            case UnmapPage(p):
                _map_page(p.hva, p.fd, p.offset)
        return None

    def _release_deleted_ids(self) -> None:
        """Hand the ids of slots deleted in this change back to the allocator early (the journal
        says so, and the undo takes fresh ids for them)."""
        for k, op in enumerate(self.journal):
            if isinstance(op, DeleteSlot) and not op.id_released:
                self.ids.release(op.slot)
                self.journal[k] = DeleteSlot(op.spec, op.slot, id_released=True)


__all__ = [
    "AddFill",
    "AddZone",
    "CreateSlot",
    "DeleteSlot",
    "LayoutChange",
    "LayoutOp",
    "MapPage",
    "RemoveFill",
    "RemoveZone",
    "UnmapPage",
    "describe",
]
