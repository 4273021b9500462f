"""`Mmu`: one vCPU's guest-physical memory map in its Unicorn engine, built from the memslots.

The model's counterpart of KVM's two-dimensional paging (arch/x86/kvm/mmu/mmu.c): guest-physical
pages are mapped to the slots' host pages on first access (kvm_tdp_page_fault -> kvm_faultin_pfn
-> direct_map: here UC_HOOK_MEM_UNMAPPED -> _on_unmapped -> mem_map_ptr), a memslot change drops
only what it changed (kvm_arch_flush_shadow_memslot / kvm_zap_gfn_range: here the pieces whose
meaning changed), writes to a LOG_DIRTY slot mark their pages (mark_page_dirty_in_slot), and an
access to memory no slot backs is handed to the access emulator (emulator_read_write.py), as an
EPT misconfig / MMIO SPTE hands it to x86.c's emulator.

How each kind of region is mapped is hv/model/guest_memory.py's table; this module decides when:
- RAM, READONLY and host-read-only slots are mapped at once (mem_map_ptr, zero-copy; READONLY
  protected so that stores are discarded after the write-protect hook): memory the CPU itself
  reads (page tables, descriptor tables) must be mapped before it is touched, because Unicorn's
  page walker does not call the unmapped-access hook.
- PCI holes and unbacked space (2**40 bytes of guest-physical space) are mapped lazily by
  _on_unmapped: once its CPU exists, Unicorn unmaps a region by flushing its TLB page by page.
- Every region is mapped in pieces cut at the same aligned boundaries (_piece_of), so that a slot
  change unmaps only the pieces whose meaning changed: punching a page out of a large slot costs
  one piece, not the slot (Unicorn unmaps page by page: 4 ms for 256 MiB).

The MEM_READ / MEM_WRITE hooks over the unbacked and non-RAM ranges (the access emulator's entry
points) are part of the map too: they move with it.
"""

from __future__ import annotations

import bisect
import ctypes
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from unicorn import (
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE,
    UC_MEM_FETCH_UNMAPPED,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    Uc,
)

from pcihole.hv.model.dirty_log import mark_page_dirty
from pcihole.hv.model.fill_window import WINDOW_BYTES, shared_fill_window
from pcihole.hv.model.guest_memory import PHYS_LIMIT, GuestRegion, RegionKind, plan_regions
from pcihole.hv.model.memslots import PAGE_SHIFT

if TYPE_CHECKING:
    from pcihole.hv.model.emulator_read_write import AccessEmulator

_PROT_RX = UC_PROT_READ | UC_PROT_EXEC
# Unicorn regions are cut at multiples of this: at most one fill window (a hole piece must alias
# one window). Not smaller: every Unicorn region added rebuilds its flat view of memory, so
# thousands of small pieces (one per probed ECAM function) would cost seconds.
_MEMORY_PIECE = WINDOW_BYTES
_EAGER = (RegionKind.RAM, RegionKind.READONLY, RegionKind.RAM_HOST_READONLY)
# Regions whose reads go down the MMIO path (vcpu_mmio_read); every non-RAM region's writes do.
MMIO_READ_KINDS = (RegionKind.UNBACKED,)
# An access is at most 8 bytes wide, so one that starts 7 bytes below a range can reach into it.
_REACH = 7
# Bounds that match no address: Unicorn keeps the hook, the hook never fires.
_NOWHERE = (1 << 64) - 0x1000


def _carve(plan: list[GuestRegion], start: int, end: int) -> list[GuestRegion]:
    """`plan` with [start, end) made one UNBACKED region (the regions around it cut short)."""
    out: list[GuestRegion] = []
    for r in plan:
        if r.end <= start or r.start >= end:
            out.append(r)
            continue
        if r.start < start:
            out.append(GuestRegion(r.start, start - r.start, r.kind, r.slot))
        if not out or out[-1].start != start:
            out.append(GuestRegion(start, end - start, RegionKind.UNBACKED))
        if r.end > end:
            out.append(GuestRegion(end, r.end - end, r.kind, r.slot))
    return out


class Mmu:
    """The memory map of one Unicorn engine (one per engine: a new engine starts with an empty map).

    `synced` is the condition a memslot change waits on (ModelVcpu.sync_memslots): it is notified
    whenever `generation` moves. `leaving()` says the engine is being left for good (close): no
    access may then map anything.
    """

    def __init__(
        self,
        vm,  # ModelVm (import cycle)
        uc: Uc,
        emulator: AccessEmulator,
        synced: threading.Condition,
        leaving: Callable[[], bool],
    ) -> None:
        self.vm = vm
        self._uc = uc
        self._emulator = emulator
        self._synced = synced
        self._leaving = leaving
        #: The memslot generation the map was built from (-1: none yet).
        self.generation = -1
        #: The mmio_map piece [start, end) kept mapped as it was by the last sync (None: the map
        #: is not provisional); the next instruction boundary maps it anew.
        self.kept: tuple[int, int] | None = None
        self._plan: list[GuestRegion] = []
        # (start, end, host - guest offset) of the RAM region read_ram read last.
        self._ram_hint: tuple[int, int, int] | None = None
        self._plan_starts: list[int] = []
        self._pieces: dict[int, tuple[tuple, int]] = {}  # Unicorn region start -> (piece key, size)
        self._dirty_hooks: dict[tuple, int] = {}
        self._slot_kinds: dict = {}  # Memslot -> RegionKind, found once per slot (guest_memory.py)
        self._access_hooks: list[int] = []  # the MEM_READ / MEM_WRITE hooks of the current plan
        self._callback_refs: list[object] = []
        # Any MEM_READ / MEM_WRITE hook makes Unicorn translate every load and store through its
        # slow path (that is how the bounded hooks below can fire); these two, which never fire,
        # keep it so whatever the plan, so that no block is translated on the fast path.
        uc.hook_add(UC_HOOK_MEM_READ, emulator.on_read, None, _NOWHERE, _NOWHERE)
        uc.hook_add(UC_HOOK_MEM_WRITE, emulator.on_write, None, _NOWHERE, _NOWHERE)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)

    def stale(self) -> bool:
        """The map lags the memslots, or is a provisional one."""
        return self.kept is not None or self.generation != self.vm.memslots.generation

    def region_at(self, addr: int) -> GuestRegion:
        return self._plan[bisect.bisect_right(self._plan_starts, addr) - 1]

    def read_ram(self, gpa: int, size: int) -> bytes | None:
        """`size` bytes of guest RAM at `gpa` straight from the slot's host pages (as the CPU's page
        walker reads them), or None where [gpa, gpa + size) is not all in one RAM / READONLY slot."""
        hint = self._ram_hint  # the last RAM region read: page tables and descriptor tables
        if hint is not None and hint[0] <= gpa and gpa + size <= hint[1]:
            return ctypes.string_at(hint[2] + gpa, size)
        region = self.region_at(gpa)
        if region.kind not in _EAGER or gpa + size > region.end:
            return None
        slot = region.memslot
        self._ram_hint = (region.start, region.end, slot.userspace_addr - slot.gpa)
        return ctypes.string_at(slot.userspace_addr + gpa - slot.gpa, size)

    def mmio_piece(self, base: int) -> tuple[int, int] | None:
        """[start, end) of the mapped mmio_map piece that starts at `base` (None: not known)."""
        piece = self._pieces.get(base)
        return None if piece is None else (base, base + piece[1])

    def sync(self, *, in_callback: bool = False, keep: tuple[int, int] | None = None) -> None:
        """Bring Unicorn's memory map in line with the current memslots, touching only what changed.

        This runs outside emulation, at an instruction boundary (the boundary hook) or in an
        IN / OUT callback, never in the middle of a memory access. Unmapping invalidates
        translations of those pages; pieces whose meaning did not change (typically the one
        holding the running code) are left alone, and the whole translation cache is flushed only
        outside callbacks.

        `keep` ([start, end) of an mmio_map piece whose callback is under way, see
        ModelVcpu.exit_to_user) stays mapped as it is: the map made is provisional, that range
        reads as unbacked (MMIO), and the next boundary maps it anew.
        """
        uc = self._uc
        with self.vm.memslots_lock:  # a consistent snapshot, also while another thread commits
            generation = self.vm.memslots.generation
            plan = plan_regions(self.vm.memslots, kinds=self._slot_kinds)
        self._plan = plan if keep is None else _carve(plan, *keep)
        self._ram_hint = None
        self._plan_starts = [r.start for r in self._plan]
        for start, (key, size) in list(self._pieces.items()):
            if self._piece_key(*self._piece_of(self.region_at(start), start)) != key:
                del self._pieces[start]
                uc.mem_unmap(start, size)
        live = {r.slot for r in self._plan if r.slot is not None}
        for slot in [s for s in self._slot_kinds if s not in live]:
            del self._slot_kinds[slot]
        wanted = {self._region_key(r) for r in self._plan}
        for key in [k for k in self._dirty_hooks if k not in wanted]:
            uc.hook_del(self._dirty_hooks.pop(key))
        for region in self._plan:
            key = self._region_key(region)
            if region.kind in _EAGER:
                # Memory the CPU itself reads (page tables, descriptor tables) must be mapped before
                # it is touched: Unicorn's page walker does not call the unmapped-access hook.
                at = region.start
                while at < region.end:
                    region_, start, end = self._piece_of(region, at)
                    if start not in self._pieces:
                        self._map_piece(region, start, end - start)
                        self._pieces[start] = (self._piece_key(region, start, end), end - start)
                    at = end
            slot = region.slot
            if (
                region.kind is RegionKind.RAM
                and slot is not None
                and slot.logs_dirty
                and key not in self._dirty_hooks
            ):
                self._dirty_hooks[key] = uc.hook_add(
                    UC_HOOK_MEM_WRITE, self._on_logged_write, slot, region.start, region.end - 1
                )
        self._hook_accesses()
        self._emulator.forget_spans()
        with self._synced:
            self.generation = generation
            self.kept = keep
            self._synced.notify_all()
        # Unicorn flushes the TLB pages of what it unmaps, but every map change also renumbers the
        # sections that the I/O TLB entries of the pages left alone point to: without a full flush,
        # an access through such an entry reaches another region (measured: an MMIO read that
        # returned 0 without calling its callback).
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        if not in_callback:
            uc.ctl_flush_tb()  # type: ignore[attr-defined]  # see ModelVcpu._prepare_engine

    def tear_down(self, keep: tuple[int, int] | None) -> None:
        """Unmap every piece but `keep` (the mmio_map piece of the callback under way, no host memory).

        For an engine being left for good (close) from an exit callback where a map change is
        safe (IN / OUT, write-protect, mmio_map; see ModelVcpu.exit_to_user): the rest of the
        translation block then faults (_on_unmapped refuses while leaving) instead of reaching host
        pages the VMM may have freed. The plan says "unbacked" everywhere so that the callbacks
        still reachable find a region.
        """
        uc = self._uc
        for start, (_key, size) in list(self._pieces.items()):
            if keep is not None and start == keep[0]:
                continue
            del self._pieces[start]
            uc.mem_unmap(start, size)
        for handle in [*self._access_hooks, *self._dirty_hooks.values()]:
            self._callback_refs.append(uc._callbacks.get(handle))  # see _hook_accesses
            uc.hook_del(handle)
        self._access_hooks, self._dirty_hooks = [], {}
        self._plan = [GuestRegion(0, PHYS_LIMIT, RegionKind.UNBACKED)]
        self._ram_hint = None
        self._plan_starts = [0]
        self._emulator.forget_spans()
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _hook_accesses(self) -> None:
        """The MEM_READ hooks over the unbacked ranges and the MEM_WRITE hooks over the non-RAM ones.

        Each range starts _REACH bytes low, for an access that starts below it and crosses into it.
        Reads of RAM, READONLY and PCI_HOLE ranges stay out of every range (no Python on them).
        """
        uc = self._uc
        for handle in self._access_hooks:
            # The binding frees the ctypes thunk of a deleted hook; this may run inside one of them.
            self._callback_refs.append(uc._callbacks.get(handle))
            uc.hook_del(handle)
        reads: list[tuple[int, int]] = []
        writes: list[tuple[int, int]] = []
        for region in self._plan:
            if region.kind in MMIO_READ_KINDS:
                reads.append((max(region.start - _REACH, 0), region.end - 1))
            if region.kind is not RegionKind.RAM:
                if writes and writes[-1][1] == region.start - 1:
                    writes[-1] = (writes[-1][0], region.end - 1)  # one hook per run of non-RAM
                else:
                    writes.append((max(region.start - _REACH, 0), region.end - 1))
        emulator = self._emulator
        self._access_hooks = [uc.hook_add(UC_HOOK_MEM_READ, emulator.on_read, None, b, e) for b, e in reads]
        self._access_hooks += [
            uc.hook_add(UC_HOOK_MEM_WRITE, emulator.on_write, None, b, e) for b, e in writes
        ]

    @staticmethod
    def _piece_of(region: GuestRegion, addr: int) -> tuple[GuestRegion, int, int]:
        """The piece of `region` that holds `addr`: cut at _MEMORY_PIECE-aligned boundaries."""
        base = addr & ~(_MEMORY_PIECE - 1)
        return region, max(region.start, base), min(region.end, base + _MEMORY_PIECE)

    @staticmethod
    def _piece_key(region: GuestRegion, start: int, end: int) -> tuple:
        """What a mapped piece means: equal keys need no remapping."""
        kind = region.kind
        backing: object
        if kind in _EAGER:
            slot = region.memslot
            backing = (slot.userspace_addr + start - slot.gpa, slot if slot.logs_dirty else None)
        elif kind is RegionKind.BAD_HVA:
            backing = region  # the callbacks' user data
        else:
            backing = None  # the fill window, or the MMIO callbacks of `start`
        return (start, end - start, kind, backing)

    @staticmethod
    def _region_key(region: GuestRegion) -> tuple:
        """What a piece of Unicorn memory depends on: equal keys need no remapping."""
        slot = region.slot
        backing = None if slot is None else (slot.userspace_addr, slot if slot.logs_dirty else None)
        return (region.start, region.size, region.kind, backing)

    def _on_unmapped(self, uc: Uc, access: int, addr: int, size: int, value: int, _data: object) -> bool:
        """Map the piece of guest-physical memory `addr` falls in; False leaves the access failing."""
        if self._leaving():
            return False  # emu_start fails: the engine is being left for good (close)
        i = bisect.bisect_right(self._plan_starts, addr) - 1
        if i < 0 or addr >= PHYS_LIMIT:
            return False
        region = self._plan[i]
        if access == UC_MEM_FETCH_UNMAPPED and region.kind in (RegionKind.UNBACKED, RegionKind.BAD_HVA):
            return False  # no instruction fetch from MMIO: emu_start fails, run() reports it
        _, start, end = self._piece_of(region, addr)
        self._map_piece(region, start, end - start)
        self._pieces[start] = (self._piece_key(region, start, end), end - start)
        return True

    def _map_piece(self, region: GuestRegion, start: int, size: int) -> None:
        uc = self._uc
        kind = region.kind
        if kind is RegionKind.RAM:
            slot = region.memslot
            uc.mem_map_ptr(start, size, UC_PROT_ALL, slot.userspace_addr + start - slot.gpa)
        elif kind in (RegionKind.READONLY, RegionKind.RAM_HOST_READONLY):
            slot = region.memslot
            uc.mem_map_ptr(start, size, UC_PROT_ALL, slot.userspace_addr + start - slot.gpa)
            # mem_protect (unlike mem_map_ptr's perms) marks the region readonly: stores are discarded
            # after the write-protect hook, so the host pages are never written.
            uc.mem_protect(start, size, _PROT_RX)
        elif kind is RegionKind.PCI_HOLE:
            # Every piece aliases the same window of fill bytes (pieces are at most a window long).
            uc.mem_map_ptr(start, size, UC_PROT_ALL, shared_fill_window().addr)
            uc.mem_protect(start, size, _PROT_RX)
        else:
            emulator = self._emulator
            if kind is RegionKind.UNBACKED:
                uc.mmio_map(start, size, emulator.on_mmio_read, start, emulator.on_mmio_write, start)
            else:  # BAD_HVA
                uc.mmio_map(start, size, emulator.on_bad_hva, region, emulator.on_bad_hva_write, region)
            # The binding keeps the ctypes thunks per range and drops them when the range is mapped
            # again; keep every one alive with the engine, since a remap can happen inside a
            # callback (IN / OUT, the boundary hook) while an old one is still on the stack.
            # (_mmio_callbacks is in unicorn_py3's Uc; mypy reads the py2 binding's, which lacks it.)
            self._callback_refs.append(uc._mmio_callbacks.get((start, start + size - 1)))  # type: ignore[attr-defined]

    def _on_logged_write(self, uc: Uc, access: int, addr: int, size: int, value: int, slot) -> None:
        """mark_page_dirty for a guest store into a LOG_DIRTY slot (both pages if it crosses one)."""
        mark_page_dirty(slot, addr >> PAGE_SHIFT)
        last = (addr + size - 1) >> PAGE_SHIFT
        if last != addr >> PAGE_SHIFT and last < slot.base_gfn + slot.npages:
            mark_page_dirty(slot, last)
