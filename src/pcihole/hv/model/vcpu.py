"""`ModelVcpu`: KVM_RUN on Unicorn, with exits delivered from inside Unicorn's callbacks by greenlet.

A KVM vCPU stops in the middle of an instruction to ask userspace for the value of an MMIO read or
an IN, and finishes the instruction on the next KVM_RUN. The model does the same without leaving
Unicorn: `run()` switches into a greenlet that runs `emu_start`; a callback that needs userspace
switches back out with the exit (run() returns it), and the next run() switches in again with the
bytes complete_read() supplied, which the callback returns to Unicorn (~1 us per exit).

Exits that end an instruction stream (HLT, a triple fault) stop `emu_start`; the greenlet reports
them and, on the next run(), starts emulating again from the current RIP.

Accesses are split as KVM's emulator splits them (emulator_read_write): only at a page boundary,
each piece read from / written to memory or sent to the MMIO bus and, unhandled, exited as one
KVM_EXIT_MMIO per 8 bytes. Unicorn splits MMIO accesses its own way (an unaligned access becomes
aligned reads or single-byte stores, 8 bytes become 4 + 4), so the model takes the whole access
from a UC_HOOK_MEM_READ / UC_HOOK_MEM_WRITE hook (which Unicorn calls once per guest access, before
it splits it), bounded to the unbacked ranges (reads) and the non-RAM ranges (writes), plus the 7
bytes below them for accesses that cross into them. The hook delivers the pieces; the callbacks
Unicorn then makes for its own pieces (mmio_map, write-protect) only replay what the hook decided.
(An aligned access of at most 4 bytes reaches those callbacks whole, so they deliver it.) Reads of
RAM, READONLY and PCI_HOLE slots never reach Python. The hooks see guest-physical addresses and a
page-crossing access is assumed physically contiguous (true of the identity maps the guests use).

Memslot changes are seen at once, also when another thread makes them while this vCPU runs: the
change arms a block hook (boundary_hook.py) whose callback, at the start of the next translation
block (an instruction boundary), rebuilds Unicorn's memory map in the vCPU's own thread and lets
emulation go on; an IN / OUT exit applies a change made during it at once. A change made during an
MMIO exit is applied at the next boundary, not in the middle of the access (Unicorn still holds
the region and TLB entry of the access), so the rest of that translation block runs on the old
map. uc_emu_stop from another thread is not used: Unicorn observes a stop request after any load
or store and restarts the interrupted instruction from its beginning, so an instruction like
`incl (mem)` or an MMIO access would run twice (kick() uses the boundary hook too).

A memslot change is also synchronous, as KVM_SET_USER_MEMORY_REGION is (synchronize_srcu): once it
returns, no vCPU uses the old slot's host pages, so the VMM may munmap them at once. Unicorn maps a
slot's pages zero-copy (mem_map_ptr) and keeps TLB entries pointing into them, so the thread that
changed the slots waits (sync_memslots) until every vCPU emulating in another thread has applied
the change at its next boundary; a vCPU outside the engine (between runs, or suspended in an
exit) applies it before the guest touches memory again. On resuming from an exit the change is
applied at once where Unicorn no longer uses the region or TLB entry of the access under way:
after IN / OUT, after a write-protect hook (the store is then discarded), and after an mmio_map
callback, whose own piece is kept mapped (as MMIO) until the next boundary. Only an exit from the
MEM_READ / MEM_WRITE hooks (an unaligned or 8-byte access touching MMIO) leaves the rest of its
translation block on the old map; such a guest must not have a slot deleted under that block.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import threading

from greenlet import getcurrent, greenlet
from unicorn import (
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_MEM_WRITE_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    Uc,
    UcError,
)
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT

from pcihole.hv import exits
from pcihole.hv.model import cpu
from pcihole.hv.model.boundary_hook import BoundaryHook
from pcihole.hv.model.dirty_log import mark_page_dirty
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.fill_window import WINDOW_BYTES, shared_fill_window
from pcihole.hv.model.guest_memory import PHYS_LIMIT, GuestRegion, RegionKind, plan_regions
from pcihole.hv.model.memslots import PAGE_SHIFT, PAGE_SIZE
from pcihole.hv.uapi import KVM_INTERNAL_ERROR_EMULATION, kvm_regs, kvm_sregs

_PROT_RX = UC_PROT_READ | UC_PROT_EXEC
_HLT_OPCODE = 0xF4
# Unicorn regions are cut at multiples of this: at most one fill window (a hole piece must alias
# one window). Not smaller: every Unicorn region added rebuilds its flat view of memory, so
# thousands of small pieces (one per probed ECAM function) would cost seconds.
_MEMORY_PIECE = WINDOW_BYTES
_EAGER = (RegionKind.RAM, RegionKind.READONLY, RegionKind.RAM_HOST_READONLY)
# Pieces of an access that go down the MMIO path (vcpu_mmio_read / vcpu_mmio_write).
_MMIO_READ_KINDS = (RegionKind.UNBACKED,)
_MMIO_WRITE_KINDS = (RegionKind.UNBACKED, RegionKind.READONLY, RegionKind.PCI_HOLE)
# Pieces whose access fails KVM_RUN with EFAULT (left to the paths that raise it).
_FAULT_KINDS = (RegionKind.BAD_HVA, RegionKind.RAM_HOST_READONLY)
# An access is at most 8 bytes wide, so one that starts 7 bytes below a range can reach into it.
_REACH = 7
# vcpu_mmio_read / vcpu_mmio_write hand the bus at most 8 bytes at a time; an exit carries <= 8.
_MMIO_CHUNK = 8
# Bounds that match no address: Unicorn keeps the hook, the hook never fires.
_NOWHERE = (1 << 64) - 0x1000


def split_at_pages(addr: int, size: int) -> list[tuple[int, int]]:
    """emulator_read_write: (gpa, length) pieces of an access, cut only at page boundaries."""
    first = min(size, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
    return [(addr, first)] if first == size else [(addr, first), (addr + first, size - first)]


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


class _Closing:
    """Sent into a suspended vCPU greenlet by close(): stop emulating and return."""


_CLOSING = _Closing()


class ModelVcpu:
    """One vCPU of a ModelVm. Same methods and semantics as the kvm backend's Vcpu."""

    def __init__(self, vm, vcpu_id: int) -> None:  # vm: ModelVm (import cycle)
        self.vm = vm
        self.id = vcpu_id
        self._regs = cpu.reset_regs()
        self._sregs = cpu.reset_sregs()
        self._uc: Uc | None = None
        self._mode: cpu.CpuMode | None = None
        self._uc_stale = True  # set_sregs changed the mode state: build a new engine
        self._mapped_generation = -1
        self._plan: list[GuestRegion] = []
        self._plan_starts: list[int] = []
        self._pieces: dict[int, tuple[tuple, int]] = {}  # Unicorn region start -> (region key, size)
        self._dirty_hooks: dict[tuple, int] = {}
        self._slot_kinds: dict = {}  # Memslot -> RegionKind, found once per slot (guest_memory.py)
        self._access_hooks: list[int] = []  # the MEM_READ / MEM_WRITE hooks of the current plan
        self._callback_refs: list[object] = []
        # The access a MEM_READ / MEM_WRITE hook took whole: Unicorn's own pieces of it (mmio_map and
        # write-protect callbacks) are answered from here instead of being delivered again.
        self._read_span: tuple | None = None  # (start, end, bytes, window start, window end)
        self._write_span: tuple[int, int] | None = None
        self._boundary: BoundaryHook | None = None
        self._boundary_stopped = False  # the boundary callback stopped emu_start (kick / restart)
        self._engine_lock = threading.Lock()  # the engine, as other threads see it (kick, remap)
        self._fault: OSError | None = None
        self._guest: greenlet | None = None
        self._suspended = False  # the guest greenlet waits inside a Unicorn callback
        self._pending_read: int | None = None  # bytes the pending MmioRead / IoIn wants
        self._read_data: bytes | None = None
        self._stop_exit: exits.VcpuExit | None = None
        self._restart = False
        self._closed = False
        self._closing = False
        self._kicked = False  # kick(): the running or next run() returns Interrupted
        # Whether the vCPU is inside the engine (emu_start, not suspended in an exit) and which
        # thread runs it: sync_memslots() waits on this for a change to be applied.
        self._sync = threading.Condition()
        self._in_engine = False
        self._thread: int | None = None
        # The map is a provisional one (the piece of an MMIO access kept): redo it at the boundary.
        self._provisional = False

    # --- registers ---------------------------------------------------------------------------------

    def _live_engine(self) -> tuple[Uc, cpu.CpuMode] | None:
        """The engine that holds the registers, if one does (else self._regs holds them)."""
        uc, mode = self._uc, self._mode
        if uc is None or mode is None or self._uc_stale:
            return None
        return uc, mode

    def get_regs(self) -> kvm_regs:
        engine = self._live_engine()
        if engine is not None:
            return cpu.read_regs(*engine)
        return kvm_regs.from_buffer_copy(self._regs)

    def set_regs(self, regs: kvm_regs) -> None:
        self._regs = kvm_regs.from_buffer_copy(regs)
        engine = self._live_engine()
        if engine is not None:
            cpu.write_regs(*engine, self._regs)

    def get_sregs(self) -> kvm_sregs:
        return kvm_sregs.from_buffer_copy(self._sregs)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        cpu.cpu_mode(sregs)  # refuse, here and now, a state the model cannot run
        engine = self._live_engine()
        if engine is not None:
            self._regs = cpu.read_regs(*engine)
        self._sregs = kvm_sregs.from_buffer_copy(sregs)
        self._uc_stale = True
        if self._suspended:
            self._restart = True

    def set_cpuid2(self, cpuid) -> None:
        """Accepted and ignored: Unicorn's CPUID is its own (the model's guests do not depend on it)."""

    # --- the coalesced ring (one page per VM, seen through every vCPU as on KVM) -------------------

    def drain_coalesced_mmio(self) -> list[exits.CoalescedWrite]:
        return self.vm.coalesced_ring.drain()

    def ring_indices(self) -> tuple[int, int]:
        return self.vm.coalesced_ring.indices()

    def set_ring_indices(self, first: int, last: int) -> None:
        """Write the ring's first/last as userspace may (coalesced_io_test sets both)."""
        self.vm.coalesced_ring.set_indices(first, last)

    # --- running -----------------------------------------------------------------------------------

    def run(self) -> exits.VcpuExit:
        """KVM_RUN: emulate until the next exit to userspace."""
        if self._closed or self._closing:
            self._unwind()  # close() from another thread left this thread's greenlet to end here
            raise ModelKvmError(errno.EBADF, "KVM_RUN", f"vcpu={self.id}", "the vCPU is closed")
        resume: bytes | None = None
        if self._pending_read is not None:
            # Like KVM, which re-enters with whatever kvm_run holds, a read nobody completed reads as
            # zeros here (the kvm backend's kvm_run would hold stale bytes).
            resume = self._read_data if self._read_data is not None else bytes(self._pending_read)
            self._pending_read = None
            self._read_data = None
        if self._kicked and not self._suspended and resume is None:
            # KVM_RUN with immediate_exit set returns EINTR before entering the guest.
            self._kicked = False
            return exits.Interrupted()
        self._thread = threading.get_ident()
        if self._guest is None or self._guest.dead:
            self._guest = greenlet(self._guest_loop)
        self._guest.parent = getcurrent()
        exit_ = self._guest.switch(resume)
        if exit_ is None:  # the greenlet ended: close() was called meanwhile (from another thread)
            raise ModelKvmError(errno.EBADF, "KVM_RUN", f"vcpu={self.id}", "the vCPU was closed")
        return exit_

    def kick(self) -> None:
        """Make the running (or the next) run() return Interrupted, like the kvm backend's kick.

        Any thread may call it: the running vCPU stops at the next instruction boundary (see
        boundary_hook.py for why not uc_emu_stop, which may run an instruction twice).
        """
        self._kicked = True
        self._request_boundary()

    def memslots_changed(self) -> None:
        """The VM's memslots changed (from any thread): apply them before the guest's next access."""
        self._request_boundary()

    def sync_memslots(self, generation: int) -> None:
        """Return once this vCPU no longer uses memslots older than `generation` (synchronize_srcu).

        A vCPU inside the engine in another thread applies the change at its next instruction
        boundary (memslots_changed armed it), or leaves the engine first; either ends the wait. A
        vCPU outside the engine applies it before it runs guest code again. Called from inside the
        engine in the vCPU's own thread (an in-kernel device changing slots), it cannot wait.
        """
        with self._sync:
            if self._thread == threading.get_ident():
                return
            while self._in_engine and not self._closed and self._mapped_generation < generation:
                self._sync.wait()

    def _set_in_engine(self, inside: bool) -> None:
        with self._sync:
            self._in_engine = inside
            if not inside:
                self._sync.notify_all()

    def _map_stale(self) -> bool:
        return self._provisional or self._mapped_generation != self.vm.memslots.generation

    def _request_boundary(self) -> None:
        with self._engine_lock:
            if self._boundary is not None and not self._closed:
                self._boundary.arm()

    def _at_boundary(self, uc: Uc) -> None:
        """The boundary hook's callback: in the vCPU thread, between two instructions."""
        if self._closing:  # leave at once, without mapping memory the VMM may be about to free
            self._boundary_stopped = True
            uc.emu_stop()
            return
        if self._map_stale():
            self._map_memory(uc, in_callback=True)
        if self._kicked or self._closing or self._restart or self._uc_stale:
            self._restart = self._restart or self._uc_stale
            self._boundary_stopped = True
            uc.emu_stop()

    def complete_read(self, data: bytes) -> None:
        if self._pending_read is None:
            raise RuntimeError(f"vcpu {self.id}: complete_read() without a pending MMIO or port-I/O read")
        if len(data) != self._pending_read:
            raise ValueError(
                f"vcpu {self.id}: the pending read wants {self._pending_read} bytes, got {len(data)}"
            )
        self._read_data = bytes(data)

    def _exit_to_user(
        self, exit_: exits.VcpuExit, *, in_access: bool = False, keep: tuple[int, int] | None = None
    ) -> bytes | None:
        """From inside a Unicorn callback: hand `exit_` to run()'s caller; return what it supplied.

        A memslot change made meanwhile is applied before returning to Unicorn where that is safe
        (module docstring): `in_access` is False after IN / OUT and a write-protect hook; `keep` is
        the piece [start, end) of the mmio_map callback under way, kept mapped as it is; an exit
        from the MEM_READ / MEM_WRITE hooks (in_access, no keep) leaves it to the next boundary.
        """
        uc = self._uc
        assert uc is not None
        if self._closing:  # close() from another thread: no more exits, leave the engine
            uc.emu_stop()
            return None
        guest = self._guest
        assert guest is not None and guest.parent is not None
        self._suspended = True
        self._set_in_engine(False)
        try:
            value = guest.parent.switch(exit_)
        finally:
            self._suspended = False
            self._set_in_engine(True)
        if value is _CLOSING:
            # close() while paused in this exit: Unicorn must leave emu_start, and it first runs on
            # to its next exit check (after the next load or store, or at the end of the
            # translation block). The VMM may have freed guest RAM already, so where the access
            # under way allows it, nothing backed by host memory stays mapped: the next access
            # faults (_on_unmapped refuses while closing) instead of touching freed pages.
            if not in_access or keep is not None:
                self._unmap_for_close(uc, keep)
            uc.emu_stop()
            return None
        if self._map_stale() and (not in_access or keep is not None):
            # The VMM may have freed the host pages of a deleted slot: none of the rest of this
            # translation block may reach them (the next boundary redoes a provisional map).
            self._map_memory(uc, in_callback=True, keep=keep)
        if self._map_stale() or self._restart or self._uc_stale:
            # In the middle of a memory access: Unicorn holds pointers into the region and the
            # TLB entry of the access under way (a map change frees the one and may resize the
            # TLB under the other), so the next instruction boundary applies the change, and
            # stops there for a new engine after set_sregs. The rest of the current translation
            # block (a few instructions at most) still runs with the old map or mode.
            self._request_boundary()
        return value

    def _guest_loop(self, _resume: object) -> None:
        """The body of the guest greenlet: emulate, report stop exits, until close()."""
        while not self._closing:
            exit_ = self._emulate()
            if exit_ is None:
                continue  # stopped to rebuild; emulate again from the current RIP
            guest = self._guest
            assert guest is not None and guest.parent is not None
            value = guest.parent.switch(exit_)
            if value is _CLOSING:
                return

    def _emulate(self) -> exits.VcpuExit | None:
        # Inside the engine before the map is brought up to date: a change committed from now on
        # either is in the map built below or waits for this vCPU's boundary (sync_memslots).
        self._set_in_engine(True)
        try:
            return self._emulate_in_engine()
        finally:
            self._set_in_engine(False)

    def _emulate_in_engine(self) -> exits.VcpuExit | None:
        uc, mode = self._prepare_engine()
        with self._engine_lock:
            if (self._kicked or self._closing) and self._boundary is not None:
                # A kick or close() from another thread that found no engine to arm (it was being
                # built): stop at the first instruction boundary instead of losing it.
                self._boundary.arm()
        try:
            self._stop_exit = None
            self._restart = False
            uc.emu_start(cpu.program_counter(uc, mode), (1 << 64) - 1)
        except UcError as e:
            if self._closing:
                return None
            if e.errno == UC_ERR_INSN_INVALID:
                # #UD with no IDT: #UD -> #DF -> triple fault, which KVM reports as KVM_EXIT_SHUTDOWN.
                return exits.Shutdown()
            if e.errno in (UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT):
                # Executing from MMIO: KVM's emulator cannot fetch the instruction either.
                return exits.InternalError(KVM_INTERNAL_ERROR_EMULATION)
            raise ModelKvmError(errno.EFAULT, "KVM_RUN", f"vcpu={self.id}", f"Unicorn stopped: {e}") from e
        if self._fault is not None:
            fault, self._fault = self._fault, None
            raise fault
        stopped, self._boundary_stopped = self._boundary_stopped, False
        if self._closing or self._restart:
            return None
        if self._stop_exit is not None:
            return self._stop_exit
        boundary = self._boundary
        if boundary is not None and not boundary.precise and boundary.armed:
            boundary.armed = False  # the fallback's uc_emu_stop (boundary_hook.py) stopped us
            stopped = True
        if stopped:
            if self._kicked:
                self._kicked = False
                return exits.Interrupted()
            return None  # stopped at a boundary for nothing the caller must see: go on
        # Otherwise emu_start returns by itself only after HLT (there is no end address or count).
        pc = cpu.program_counter(uc, mode)
        if uc.mem_read(pc - 1, 1)[0] == _HLT_OPCODE:
            return exits.Hlt()
        return exits.InternalError(KVM_INTERNAL_ERROR_EMULATION)

    # --- the engine and its memory map -------------------------------------------------------------

    def _prepare_engine(self) -> tuple[Uc, cpu.CpuMode]:
        """The engine to run, built if need be, with its memory map brought up to date."""
        uc, mode = self._uc, self._mode
        if uc is None or mode is None or self._uc_stale:
            # set_sregs saved the old engine's registers into self._regs when it made it stale.
            self._mode = mode = cpu.cpu_mode(self._sregs)
            uc = cpu.new_engine(mode, self._regs, self._sregs)
            with self._engine_lock:
                self._uc, self._boundary = uc, None
                self._uc_stale = False
                self._mapped_generation = -1
                self._pieces, self._dirty_hooks, self._access_hooks, self._callback_refs = {}, {}, [], []
                self._slot_kinds = {}
                self._install_hooks(uc)
        if self._map_stale():
            self._map_memory(uc)
        else:
            # The VMM may have written guest code through the HVA since Unicorn translated it.
            # (ctl_flush_tb is in unicorn_py3's Uc; mypy reads the py2 binding's, which lacks it.)
            uc.ctl_flush_tb()  # type: ignore[attr-defined]
        return uc, mode

    def _install_hooks(self, uc: Uc) -> None:
        self._boundary = BoundaryHook(uc, self._at_boundary)
        # Any MEM_READ / MEM_WRITE hook makes Unicorn translate every load and store through its
        # slow path (that is how the bounded hooks below can fire); these two, which never fire,
        # keep it so whatever the plan, so that no block is translated on the fast path.
        uc.hook_add(UC_HOOK_MEM_READ, self._on_read, None, _NOWHERE, _NOWHERE)
        uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write, None, _NOWHERE, _NOWHERE)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._on_write_protected)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)

    def _map_memory(self, uc: Uc, *, in_callback: bool = False, keep: tuple[int, int] | None = None) -> None:
        """Bring Unicorn's memory map in line with the current memslots, touching only what changed.

        Slots backed by host memory are mapped at once. PCI holes and unbacked space are not:
        guest-physical space is 2**40 bytes and Unicorn, once its CPU exists, unmaps a region by
        flushing its TLB page by page. Instead the unmapped-access hook maps the piece an access
        falls in (_on_unmapped). Every region is mapped in pieces cut at the same aligned
        boundaries (_piece_of), and a change of the slots unmaps only the pieces whose meaning
        changed: punching a page out of a large slot costs one piece, not the slot (Unicorn unmaps
        page by page: 4 ms for 256 MiB). This runs outside emulation, at an instruction boundary
        (the boundary hook) or in an IN / OUT callback, never in the middle of a memory access.
        Unmapping invalidates translations of those pages; pieces whose meaning did not change
        (typically the one holding the running code) are left alone, and the whole translation
        cache is flushed only outside callbacks.

        `keep` ([start, end) of an mmio_map piece whose callback is under way, see _exit_to_user)
        stays mapped as it is: the map made is provisional, that range reads as unbacked (MMIO),
        and the next boundary maps it anew.
        """
        with self.vm.memslots_lock:  # a consistent snapshot, also while another thread commits
            generation = self.vm.memslots.generation
            plan = plan_regions(self.vm.memslots, kinds=self._slot_kinds)
        self._plan = plan if keep is None else _carve(plan, *keep)
        self._plan_starts = [r.start for r in self._plan]
        for start, (key, size) in list(self._pieces.items()):
            if self._piece_key(*self._piece_of(self._region_at(start), start)) != key:
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
                        self._map_piece(uc, region, start, end - start)
                        self._pieces[start] = (self._piece_key(region, start, end), end - start)
                    at = end
            slot = region.slot
            if region.kind is RegionKind.RAM and slot is not None and slot.logs_dirty and key not in self._dirty_hooks:
                self._dirty_hooks[key] = uc.hook_add(
                    UC_HOOK_MEM_WRITE, self._on_logged_write, slot, region.start, region.end - 1
                )
        self._hook_accesses(uc)
        self._read_span = self._write_span = None
        with self._sync:
            self._mapped_generation = generation
            self._provisional = keep is not None
            self._sync.notify_all()
        # Unicorn flushes the TLB pages of what it unmaps, but every map change also renumbers the
        # sections that the I/O TLB entries of the pages left alone point to: without a full flush,
        # an access through such an entry reaches another region (measured: an MMIO read that
        # returned 0 without calling its callback).
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        if not in_callback:
            uc.ctl_flush_tb()  # type: ignore[attr-defined]  # see _prepare_engine

    def _hook_accesses(self, uc: Uc) -> None:
        """The MEM_READ hooks over the unbacked ranges and the MEM_WRITE hooks over the non-RAM ones.

        Each range starts _REACH bytes low, for an access that starts below it and crosses into it.
        Reads of RAM, READONLY and PCI_HOLE ranges stay out of every range (no Python on them).
        """
        for handle in self._access_hooks:
            # The binding frees the ctypes thunk of a deleted hook; this may run inside one of them.
            self._callback_refs.append(uc._callbacks.get(handle))
            uc.hook_del(handle)
        reads: list[tuple[int, int]] = []
        writes: list[tuple[int, int]] = []
        for region in self._plan:
            if region.kind in _MMIO_READ_KINDS:
                reads.append((max(region.start - _REACH, 0), region.end - 1))
            if region.kind is not RegionKind.RAM:
                if writes and writes[-1][1] == region.start - 1:
                    writes[-1] = (writes[-1][0], region.end - 1)  # one hook per run of non-RAM
                else:
                    writes.append((max(region.start - _REACH, 0), region.end - 1))
        self._access_hooks = [uc.hook_add(UC_HOOK_MEM_READ, self._on_read, None, b, e) for b, e in reads]
        self._access_hooks += [uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write, None, b, e) for b, e in writes]

    def _region_at(self, addr: int) -> GuestRegion:
        return self._plan[bisect.bisect_right(self._plan_starts, addr) - 1]

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
        if self._closing:
            return False  # emu_start fails: the engine is being left (close)
        i = bisect.bisect_right(self._plan_starts, addr) - 1
        if i < 0 or addr >= PHYS_LIMIT:
            return False
        region = self._plan[i]
        if access == UC_MEM_FETCH_UNMAPPED and region.kind in (RegionKind.UNBACKED, RegionKind.BAD_HVA):
            return False  # no instruction fetch from MMIO: emu_start fails, run() reports it
        _, start, end = self._piece_of(region, addr)
        self._map_piece(uc, region, start, end - start)
        self._pieces[start] = (self._piece_key(region, start, end), end - start)
        return True

    def _unmap_for_close(self, uc: Uc, keep: tuple[int, int] | None) -> None:
        """Unmap every piece but `keep` (the mmio_map piece of the callback under way, no host memory).

        Run from an exit callback where a map change is safe (IN / OUT, write-protect, mmio_map;
        see _exit_to_user) while close() unwinds the engine; the plan says "unbacked" everywhere so
        that the callbacks still reachable find a region, and they exit no more (_closing).
        """
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
        self._plan_starts = [0]
        self._read_span = self._write_span = None
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _map_piece(self, uc: Uc, region: GuestRegion, start: int, size: int) -> None:
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
            if kind is RegionKind.UNBACKED:
                uc.mmio_map(start, size, self._on_mmio_read, start, self._on_mmio_write, start)
            else:  # BAD_HVA
                uc.mmio_map(start, size, self._on_bad_hva, region, self._on_bad_hva_write, region)
            # The binding keeps the ctypes thunks per range and drops them when the range is mapped
            # again; keep every one alive with the engine, since a remap can happen inside a
            # callback (IN / OUT, the boundary hook) while an old one is still on the stack.
            # (_mmio_callbacks is in unicorn_py3's Uc; mypy reads the py2 binding's, which lacks it.)
            self._callback_refs.append(uc._mmio_callbacks.get((start, start + size - 1)))  # type: ignore[attr-defined]

    # --- the access paths, as arch/x86/kvm/x86.c takes them ------------------------------------------

    def _on_read(self, uc: Uc, access: int, addr: int, size: int, value: int, _data: object) -> None:
        """A guest read touching unbacked space, whole: emulator_read_write's pieces and exits.

        Each page piece in unbacked space goes to the MMIO bus (vcpu_mmio_read, 8 bytes at a time);
        what no device answers becomes a fragment, and the fragments exit in order, one MmioRead
        per 8 bytes. Pieces in slots are left to Unicorn, which reads them natively. The bytes are
        kept in _read_span for the mmio_map callbacks Unicorn makes next for its own pieces.
        """
        self._read_span = None
        if size <= 4 and not addr & (size - 1):
            # Aligned and at most 4 bytes: Unicorn neither widens nor splits it, so the mmio_map
            # callback sees the whole access and takes the KVM path itself (the common case).
            return
        buf = bytearray(size)
        fragments = []
        touched = False
        for gpa, length in split_at_pages(addr, size):
            if self._region_at(gpa).kind not in _MMIO_READ_KINDS:
                continue
            touched = True
            off = gpa - addr
            done = 0
            while done < length:
                n = min(length - done, _MMIO_CHUNK)
                data = self.vm.mmio_bus.read(gpa + done, n)
                if data is None:
                    break
                buf[off + done : off + done + n] = data
                done += n
            if done < length:
                fragments.append((gpa + done, length - done, off + done))
        if not touched:
            return
        for gpa, length, off in fragments:
            for i in range(0, length, _MMIO_CHUNK):
                n = min(length - i, _MMIO_CHUNK)
                self._pending_read = n
                data = self._exit_to_user(exits.MmioRead(gpa + i, n), in_access=True)
                if data is not None:
                    buf[off + i : off + i + n] = data
        # Unicorn reads an unaligned access as two aligned ones of its size, [low, low + 2 * size).
        low = addr & ~(size - 1)
        self._read_span = (addr, addr + size, bytes(buf), low, max(low + 2 * size, addr + size))

    def _on_write(self, uc: Uc, access: int, addr: int, size: int, value: int, _data: object) -> None:
        """A guest write touching a non-RAM range, whole: emulator_read_write's pieces and exits.

        A piece in RAM is written to memory (before any exit, as the emulator does); a piece in a
        READONLY / PCI_HOLE slot or in unbacked space goes to the MMIO bus (vcpu_mmio_write, 8 bytes
        at a time: coalesced zones, fill devices), and what no device takes exits, after every
        piece has been offered to the bus, one MmioWrite per 8 bytes. Unicorn's own handling of the
        store that follows (write-protect hook, mmio_map callbacks, byte stores) delivers nothing.
        """
        self._read_span = None
        if size <= 4 and not addr & (size - 1):
            # Aligned and at most 4 bytes: the write-protect hook or the mmio_map callback gets it
            # whole, once (Unicorn neither splits it nor stores it byte by byte), and delivers it.
            self._write_span = None
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        pieces = [(gpa, length, self._region_at(gpa)) for gpa, length in split_at_pages(addr, size)]
        if all(r.kind is RegionKind.RAM for _, _, r in pieces) or any(
            r.kind in _FAULT_KINDS for _, _, r in pieces
        ):
            self._write_span = None  # plain RAM, or KVM_RUN fails (the write-protect / mmio path raises)
            return
        self._write_span = (addr, addr + size)
        fragments = []
        for gpa, length, region in pieces:
            chunk = data[gpa - addr : gpa - addr + length]
            if region.kind is RegionKind.RAM:
                slot = region.memslot
                ctypes.memmove(slot.userspace_addr + gpa - slot.gpa, chunk, length)
                if slot.logs_dirty and not region.start <= addr < region.end:
                    mark_page_dirty(slot, gpa >> PAGE_SHIFT)  # the dirty hook saw only `addr`
                continue
            done = 0
            while done < length:
                n = min(length - done, _MMIO_CHUNK)
                if not self.vm.mmio_bus.write(gpa + done, chunk[done : done + n]):
                    break
                done += n
            if done < length:
                fragments.append((gpa + done, chunk[done:]))
        for gpa, rest in fragments:
            for i in range(0, len(rest), _MMIO_CHUNK):
                self._exit_to_user(exits.MmioWrite(gpa + i, rest[i : i + _MMIO_CHUNK]), in_access=True)

    def _taken_by_write_hook(self, addr: int, size: int) -> bool:
        span = self._write_span
        return span is not None and span[0] <= addr and addr + size <= span[1]

    def _mmio_write(self, addr: int, data: bytes, *, in_access: bool, keep: tuple[int, int] | None) -> None:
        """vcpu_mmio_write for a store the write hook did not take whole (aligned, at most 4 bytes).

        From an mmio_map callback (in_access, `keep` its piece) or the write-protect hook (not).
        """
        if not self.vm.mmio_bus.write(addr, data):
            self._exit_to_user(exits.MmioWrite(addr, data), in_access=in_access, keep=keep)

    def _on_write_protected(
        self, uc: Uc, access: int, addr: int, size: int, value: int, _data: object
    ) -> bool:
        """A store to a READONLY / PCI_HOLE slot (Unicorn discards the store itself once we return).

        Unicorn calls this for the whole store and again for every byte of an unaligned one; the
        write hook has already delivered it (KVM_PFN_ERR_RO_FAULT -> emulator -> MMIO).
        """
        region = self._region_at(addr)
        if region.kind is RegionKind.RAM_HOST_READONLY:
            raise ModelKvmError(
                errno.EFAULT,
                "KVM_RUN",
                f"vcpu={self.id}",
                f"write to {region.memslot.describe()} whose host pages are read-only",
            )
        if not self._taken_by_write_hook(addr, size):
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._mmio_write(addr, data, in_access=False, keep=None)
        return True

    def _on_mmio_write(self, uc: Uc, offset: int, size: int, value: int, base: int) -> None:
        addr = base + offset
        if not self._taken_by_write_hook(addr, size):
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._mmio_write(addr, data, in_access=True, keep=self._mmio_piece(base))

    def _on_mmio_read(self, uc: Uc, offset: int, size: int, base: int) -> int:
        """One of Unicorn's pieces of a read the read hook took whole: its bytes from _read_span.

        Unicorn widens an unaligned read into aligned ones; the bytes outside the guest's access
        are dropped by Unicorn, so they read as 0 here and reach no device.
        """
        addr = base + offset
        span = self._read_span
        if span is not None and span[3] <= addr and addr + size <= span[4]:
            start, end, data = span[:3]
            lo, hi = max(addr, start), min(addr + size, end)
            if lo >= hi:
                return 0
            return int.from_bytes(data[lo - start : hi - start], "little") << (8 * (lo - addr))
        # vcpu_mmio_read for an access no hook took whole (not expected: the hooks cover them all).
        data = self.vm.mmio_bus.read(addr, size)
        if data is None:
            self._pending_read = size
            data = self._exit_to_user(exits.MmioRead(addr, size), in_access=True, keep=self._mmio_piece(base))
            if data is None:
                return 0
        return int.from_bytes(data, "little")

    def _mmio_piece(self, base: int) -> tuple[int, int] | None:
        """[start, end) of the mapped mmio_map piece that starts at `base` (None: not known)."""
        piece = self._pieces.get(base)
        return None if piece is None else (base, base + piece[1])

    def _on_logged_write(self, uc: Uc, access: int, addr: int, size: int, value: int, slot) -> None:
        """mark_page_dirty for a guest store into a LOG_DIRTY slot (both pages if it crosses one)."""
        mark_page_dirty(slot, addr >> PAGE_SHIFT)
        last = (addr + size - 1) >> PAGE_SHIFT
        if last != addr >> PAGE_SHIFT and last < slot.base_gfn + slot.npages:
            mark_page_dirty(slot, last)

    def _on_bad_hva(self, uc: Uc, offset: int, size: int, region: GuestRegion) -> int:
        """KVM_RUN fails with EFAULT (hva_to_pfn finds nothing there); emu_start stops, run() raises."""
        if self._fault is None:
            self._fault = ModelKvmError(
                errno.EFAULT,
                "KVM_RUN",
                f"vcpu={self.id}",
                f"guest access to {region.memslot.describe()} whose userspace_addr "
                f"{region.memslot.userspace_addr:#x} is not mapped in this process",
            )
        uc.emu_stop()
        return 0

    def _on_bad_hva_write(self, uc: Uc, offset: int, size: int, value: int, region: GuestRegion) -> None:
        self._on_bad_hva(uc, offset, size, region)

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _data: object) -> None:
        """OUT: KVM_PIO_BUS devices (coalesced PIO zones), else KVM_EXIT_IO."""
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if not self.vm.pio_bus.write(port, data):
            self._exit_to_user(exits.IoOut(port, size, data))

    def _on_in(self, uc: Uc, port: int, size: int, _data: object) -> int:
        """IN: nothing on the model's PIO bus answers reads, so every IN exits (KVM_EXIT_IO)."""
        self._pending_read = size
        data = self._exit_to_user(exits.IoIn(port, size))
        return int.from_bytes(data, "little") if data is not None else 0

    def _on_interrupt(self, uc: Uc, intno: int, _data: object) -> None:
        """An exception or INT n. The model delivers none: with no IDT, KVM's guest triple-faults."""
        self._stop_exit = exits.Shutdown()
        uc.emu_stop()

    def _on_invalid(self, uc: Uc, _data: object) -> bool:
        return False  # emu_start fails with UC_ERR_INSN_INVALID -> Shutdown

    # --- teardown ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Make the engine leave emu_start for good, then drop it (before the VMM frees guest RAM).

        A greenlet paused in an exit is resumed once with _CLOSING: its callback unmaps what it
        safely can and stops the engine (_exit_to_user). A greenlet runs only in the thread that
        started it: one running in another thread is stopped at its next instruction boundary and
        waited for; one paused there in an exit is unwound by that thread's next run().
        """
        if self._closed:
            return
        self._closing = True
        if self._thread in (None, threading.get_ident()):
            self._unwind()
        else:
            self._request_boundary()
            with self._sync:
                while self._in_engine:
                    self._sync.wait()
        with self._engine_lock:
            self._uc = self._boundary = None
            self._closed = True
        with self._sync:
            self._in_engine = False
            self._sync.notify_all()

    def _unwind(self) -> None:
        """End this thread's guest greenlet, if it is paused (in an exit, or between two runs)."""
        guest = self._guest
        if guest is not None and not guest.dead and guest and self._thread == threading.get_ident():
            guest.parent = getcurrent()
            guest.switch(_CLOSING)
        if guest is None or guest.dead:
            self._guest = None

    def __enter__(self) -> ModelVcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
