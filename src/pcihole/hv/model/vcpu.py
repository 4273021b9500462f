"""`ModelVcpu`: KVM_RUN on Unicorn, with exits delivered from inside Unicorn's callbacks by greenlet.

A KVM vCPU stops in the middle of an instruction to ask userspace for the value of an MMIO read or
an IN, and finishes the instruction on the next KVM_RUN. The model does the same without leaving
Unicorn: `run()` switches into a greenlet that runs `emu_start`; a callback that needs userspace
switches back out with the exit (run() returns it), and the next run() switches in again with the
bytes complete_read() supplied, which the callback returns to Unicorn (~1 us per exit).

Exits that end an instruction stream (HLT, a triple fault) stop `emu_start`; the greenlet reports
them and, on the next run(), starts emulating again from the current RIP. So does a change of the
memslots or of the special registers: Unicorn's memory map is rebuilt only while it is stopped,
because changing it from inside a callback could invalidate the very translation block that runs.
"""

from __future__ import annotations

import bisect
import errno

from greenlet import getcurrent, greenlet
from unicorn import (
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
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
from pcihole.hv.kvm.uapi import KVM_INTERNAL_ERROR_EMULATION, kvm_regs, kvm_sregs
from pcihole.hv.model import cpu
from pcihole.hv.model.dirty_log import mark_page_dirty
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.fill_window import WINDOW_BYTES, shared_fill_window
from pcihole.hv.model.guest_memory import PHYS_LIMIT, GuestRegion, RegionKind, plan_regions
from pcihole.hv.model.memslots import PAGE_SHIFT

_PROT_RX = UC_PROT_READ | UC_PROT_EXEC
_HLT_OPCODE = 0xF4
# How much the unmapped-access hook maps at once: memory pieces up to one fill window (a hole piece
# must alias one window). MMIO pieces as large: every Unicorn region added rebuilds its flat view
# of memory, so thousands of small pieces (one per probed ECAM function) would cost seconds.
_MEMORY_PIECE = WINDOW_BYTES
_MMIO_PIECE = WINDOW_BYTES
_EAGER = (RegionKind.RAM, RegionKind.READONLY, RegionKind.RAM_HOST_READONLY)


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
        self._callback_refs: list[object] = []
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

    # --- registers ---------------------------------------------------------------------------------

    def get_regs(self) -> kvm_regs:
        if self._uc is not None and not self._uc_stale:
            return cpu.read_regs(self._uc, self._mode)
        return kvm_regs.from_buffer_copy(self._regs)

    def set_regs(self, regs: kvm_regs) -> None:
        self._regs = kvm_regs.from_buffer_copy(regs)
        if self._uc is not None and not self._uc_stale:
            cpu.write_regs(self._uc, self._mode, self._regs)

    def get_sregs(self) -> kvm_sregs:
        return kvm_sregs.from_buffer_copy(self._sregs)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        cpu.cpu_mode(sregs)  # refuse, here and now, a state the model cannot run
        if self._uc is not None and not self._uc_stale:
            self._regs = cpu.read_regs(self._uc, self._mode)
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
        if self._closed:
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
        if self._guest is None or self._guest.dead:
            self._guest = greenlet(self._guest_loop)
        self._guest.parent = getcurrent()
        return self._guest.switch(resume)

    def kick(self) -> None:
        """Make the running (or the next) run() return Interrupted, like the kvm backend's kick.

        uc_emu_stop may be called from another thread: it asks the emulating thread to leave its
        translation block at the next boundary, and emu_start then returns with no exit pending.
        """
        self._kicked = True
        if self._uc is not None and not self._closed:
            self._uc.emu_stop()

    def complete_read(self, data: bytes) -> None:
        if self._pending_read is None:
            raise RuntimeError(f"vcpu {self.id}: complete_read() without a pending MMIO or port-I/O read")
        if len(data) != self._pending_read:
            raise ValueError(
                f"vcpu {self.id}: the pending read wants {self._pending_read} bytes, got {len(data)}"
            )
        self._read_data = bytes(data)

    def _exit_to_user(self, exit_: exits.VcpuExit) -> bytes | None:
        """From inside a Unicorn callback: hand `exit_` to run()'s caller; return what it supplied."""
        self._suspended = True
        try:
            value = self._guest.parent.switch(exit_)
        finally:
            self._suspended = False
        if value is _CLOSING:
            self._uc.emu_stop()
            return None
        if self._mapped_generation != self.vm.memslots.generation:
            self._map_memory(self._uc, in_callback=True)
        if self._restart or self._uc_stale:
            # set_sregs during an exit: a new engine is needed, which only a stopped vCPU can get.
            # The rest of the current translation block still runs in the old mode.
            self._restart = True
            self._uc.emu_stop()
        return value

    def _guest_loop(self, _resume: object) -> None:
        """The body of the guest greenlet: emulate, report stop exits, until close()."""
        while not self._closing:
            exit_ = self._emulate()
            if exit_ is None:
                continue  # stopped to rebuild; emulate again from the current RIP
            value = self._guest.parent.switch(exit_)
            if value is _CLOSING:
                return

    def _emulate(self) -> exits.VcpuExit | None:
        self._prepare_engine()
        uc, mode = self._uc, self._mode
        self._stop_exit = None
        self._restart = False
        try:
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
        if self._closing or self._restart:
            return None
        if self._stop_exit is not None:
            return self._stop_exit
        if self._kicked:
            self._kicked = False
            return exits.Interrupted()
        # emu_start returns by itself only after HLT (there is no end address or count).
        pc = cpu.program_counter(uc, mode)
        if uc.mem_read(pc - 1, 1)[0] == _HLT_OPCODE:
            return exits.Hlt()
        return exits.InternalError(KVM_INTERNAL_ERROR_EMULATION)

    # --- the engine and its memory map -------------------------------------------------------------

    def _prepare_engine(self) -> None:
        if self._uc is None or self._uc_stale:
            # set_sregs saved the old engine's registers into self._regs when it made it stale.
            self._mode = cpu.cpu_mode(self._sregs)
            self._uc = cpu.new_engine(self._mode, self._regs, self._sregs)
            self._uc_stale = False
            self._mapped_generation = -1
            self._pieces, self._dirty_hooks, self._callback_refs = {}, {}, []
            self._install_hooks(self._uc)
        if self._mapped_generation != self.vm.memslots.generation:
            self._map_memory(self._uc)
        else:
            # The VMM may have written guest code through the HVA since Unicorn translated it.
            self._uc.ctl_flush_tb()

    def _install_hooks(self, uc: Uc) -> None:
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._on_write_protected)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)

    def _map_memory(self, uc: Uc, *, in_callback: bool = False) -> None:
        """Bring Unicorn's memory map in line with the current memslots, touching only what changed.

        Slots backed by host memory are mapped at once. PCI holes and unbacked space are not:
        guest-physical space is 2**40 bytes and Unicorn, once its CPU exists, unmaps a region by
        flushing its TLB page by page. Instead the unmapped-access hook maps the piece an access
        falls in (_on_unmapped), and a change of the slots unmaps the
        pieces whose meaning changed. This may run inside a Unicorn callback (the VMM changed the
        slots while the vCPU waited for an exit to be completed): the rest of the current
        translation block then sees the new map, as the next instruction would on KVM. Unmapping
        flushes Unicorn's TLB and invalidates translations of those pages; pieces whose meaning did
        not change (typically the one holding the running code) are left alone, and the whole
        translation cache is flushed only outside callbacks.
        """
        self._plan = plan_regions(self.vm.memslots)
        self._plan_starts = [r.start for r in self._plan]
        wanted = {self._region_key(r) for r in self._plan}
        for start, (key, size) in list(self._pieces.items()):
            if key not in wanted:
                del self._pieces[start]
                uc.mem_unmap(start, size)
        for key in [k for k in self._dirty_hooks if k not in wanted]:
            uc.hook_del(self._dirty_hooks.pop(key))
        for region in self._plan:
            key = self._region_key(region)
            if region.kind in _EAGER and region.start not in self._pieces:
                # Memory the CPU itself reads (page tables, descriptor tables) must be mapped before
                # it is touched: Unicorn's page walker does not call the unmapped-access hook.
                self._map_piece(uc, region, region.start, region.size)
                self._pieces[region.start] = (key, region.size)
            if region.kind is RegionKind.RAM and region.slot.logs_dirty and key not in self._dirty_hooks:
                self._dirty_hooks[key] = uc.hook_add(
                    UC_HOOK_MEM_WRITE, self._on_logged_write, region.slot, region.start, region.end - 1
                )
        self._mapped_generation = self.vm.memslots.generation
        if not in_callback:
            uc.ctl_flush_tb()

    @staticmethod
    def _region_key(region: GuestRegion) -> tuple:
        """What a piece of Unicorn memory depends on: equal keys need no remapping."""
        slot = region.slot
        backing = None if slot is None else (slot.userspace_addr, slot if slot.logs_dirty else None)
        return (region.start, region.size, region.kind, backing)

    def _on_unmapped(self, uc: Uc, access: int, addr: int, size: int, value: int, _data: object) -> bool:
        """Map the piece of guest-physical memory `addr` falls in; False leaves the access failing."""
        i = bisect.bisect_right(self._plan_starts, addr) - 1
        if i < 0 or addr >= PHYS_LIMIT:
            return False
        region = self._plan[i]
        if access == UC_MEM_FETCH_UNMAPPED and region.kind in (RegionKind.UNBACKED, RegionKind.BAD_HVA):
            return False  # no instruction fetch from MMIO: emu_start fails, run() reports it
        piece = _MMIO_PIECE if region.kind in (RegionKind.UNBACKED, RegionKind.BAD_HVA) else _MEMORY_PIECE
        start = max(region.start, addr & ~(piece - 1))
        end = min(region.end, (addr & ~(piece - 1)) + piece)
        self._map_piece(uc, region, start, end - start)
        self._pieces[start] = (self._region_key(region), end - start)
        return True

    def _map_piece(self, uc: Uc, region: GuestRegion, start: int, size: int) -> None:
        kind, slot = region.kind, region.slot
        if kind is RegionKind.RAM:
            uc.mem_map_ptr(start, size, UC_PROT_ALL, slot.userspace_addr + start - slot.gpa)
        elif kind in (RegionKind.READONLY, RegionKind.RAM_HOST_READONLY):
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
            # callback that returns through the old thunk.
            self._callback_refs.append(uc._mmio_callbacks.get((start, start + size - 1)))

    # --- the access paths, as arch/x86/kvm/x86.c takes them ------------------------------------------

    def _mmio_write(self, addr: int, data: bytes) -> None:
        """vcpu_mmio_write: KVM_MMIO_BUS devices (coalesced zones, fill devices), else KVM_EXIT_MMIO."""
        if not self.vm.mmio_bus.write(addr, data):
            self._exit_to_user(exits.MmioWrite(addr, data))

    def _on_write_protected(
        self, uc: Uc, access: int, addr: int, size: int, value: int, _data: object
    ) -> bool:
        """A store to a READONLY / PCI_HOLE slot (Unicorn discards the store itself once we return)."""
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        slot = self.vm.memslots.find_gpa(addr)
        if slot is not None and not slot.readonly and not slot.pci_hole:
            raise ModelKvmError(
                errno.EFAULT,
                "KVM_RUN",
                f"vcpu={self.id}",
                f"write to {slot.describe()} whose host pages are read-only",
            )
        # KVM_PFN_ERR_RO_FAULT -> RET_PF_EMULATE -> emulator_read_write_onepage -> MMIO.
        self._mmio_write(addr, data)
        return True

    def _on_mmio_write(self, uc: Uc, offset: int, size: int, value: int, base: int) -> None:
        self._mmio_write(base + offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _on_mmio_read(self, uc: Uc, offset: int, size: int, base: int) -> int:
        """vcpu_mmio_read: KVM_MMIO_BUS devices (fill devices), else a KVM_EXIT_MMIO read."""
        addr = base + offset
        data = self.vm.mmio_bus.read(addr, size)
        if data is None:
            self._pending_read = size
            data = self._exit_to_user(exits.MmioRead(addr, size))
            if data is None:
                return 0
        return int.from_bytes(data, "little")

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
                f"guest access to {region.slot.describe()} whose userspace_addr "
                f"{region.slot.userspace_addr:#x} is not mapped in this process",
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
        """Unwind a guest greenlet suspended inside emu_start, then drop the engine."""
        if self._closed:
            return
        self._closing = True
        guest = self._guest
        if guest is not None and not guest.dead and guest:  # started and not finished
            guest.parent = getcurrent()
            guest.switch(_CLOSING)
        self._guest = None
        self._uc = None
        self._closed = True

    def __enter__(self) -> ModelVcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
