"""`AccessEmulator`: a guest memory access that leaves RAM, cut and delivered as KVM's emulator does.

The model's counterpart of arch/x86/kvm/x86.c's emulator_read_write(): an access is split only at
a page boundary (emulator_read_write_onepage), each piece is read from / written to memory or
offered to the MMIO bus 8 bytes at a time (vcpu_mmio_read / vcpu_mmio_write: coalesced zones,
fill devices), and what no device takes exits to userspace as one KVM_EXIT_MMIO per 8 bytes.

Unicorn splits MMIO accesses its own way (an unaligned access becomes aligned reads or single-byte
stores, 8 bytes become 4 + 4), so the whole access is taken from a UC_HOOK_MEM_READ /
UC_HOOK_MEM_WRITE hook (which Unicorn calls once per guest access, before it splits it), bounded
by the memory map (mmu.py) to the unbacked ranges (reads) and the non-RAM ranges (writes), plus the
7 bytes below them for accesses that cross into them. The hook delivers the pieces; the callbacks
Unicorn then makes for its own pieces (mmio_map, write-protect) only replay what the hook decided
(the "span"). An aligned access of at most 4 bytes reaches those callbacks whole, so they deliver
it. Reads of RAM, READONLY and PCI_HOLE slots never reach Python. The hooks see guest-physical
addresses and a page-crossing access is assumed physically contiguous (true of the identity maps
the guests use).

Exits and failures go to the vCPU through a narrow interface (`ExitPort`): the emulator never
touches the vCPU's state, the greenlet or the engine's lifetime.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Protocol

from unicorn import UC_HOOK_MEM_WRITE_PROT, Uc

from pcihole.hv import exits
from pcihole.hv.model.dirty_log import mark_page_dirty
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.guest_memory import GuestRegion, RegionKind
from pcihole.hv.model.io_bus import IoDevice
from pcihole.hv.model.memslots import PAGE_SHIFT, PAGE_SIZE
from pcihole.hv.model.mmu import MMIO_READ_KINDS, Mmu

# Pieces whose access fails KVM_RUN with EFAULT (left to the paths that raise it).
_FAULT_KINDS = (RegionKind.BAD_HVA, RegionKind.RAM_HOST_READONLY)
# vcpu_mmio_read / vcpu_mmio_write hand the bus at most 8 bytes at a time; an exit carries <= 8.
_MMIO_CHUNK = 8


class ExitPort(Protocol):
    """What the emulator needs of its vCPU."""

    def exit_to_user(
        self, exit_: exits.VcpuExit, *, in_access: bool = False, keep: tuple[int, int] | None = None
    ) -> bytes | None:
        """Hand `exit_` to run()'s caller from inside a Unicorn callback; the bytes it supplied (a
        read), or None. `in_access`: from inside a memory access; `keep`: the mmio_map piece of
        that access ([start, end)), which a memslot change applied meanwhile must leave mapped."""
        ...

    def fail(self, uc: Uc, error: OSError) -> None:
        """KVM_RUN fails with `error`: stop the engine; run() raises it."""
        ...


def split_at_pages(addr: int, size: int) -> list[tuple[int, int]]:
    """emulator_read_write: (gpa, length) pieces of an access, cut only at page boundaries."""
    first = min(size, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
    return [(addr, first)] if first == size else [(addr, first), (addr + first, size - first)]


class AccessEmulator:
    """The access paths of one engine, as arch/x86/kvm/x86.c takes them. attach() before use."""

    def __init__(self, vm, port: ExitPort, vcpu_id: int, lapic: IoDevice | None = None) -> None:
        # vm: ModelVm (import cycle); lapic: the vCPU's own MMIO device, asked before the bus
        self.vm = vm
        self._lapic = lapic
        self._port = port
        self._vcpu_id = vcpu_id
        self._mmu: Mmu | None = None
        # The access a MEM_READ / MEM_WRITE hook took whole: Unicorn's own pieces of it (mmio_map and
        # write-protect callbacks) are answered from here instead of being delivered again.
        self._read_span: tuple | None = None  # (start, end, bytes, window start, window end)
        self._write_span: tuple[int, int] | None = None

    def attach(self, uc: Uc, mmu: Mmu) -> None:
        """Use `mmu`'s regions; take stores to READONLY / PCI_HOLE slots (write-protect hook)."""
        self._mmu = mmu
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self.on_write_protected)

    @property
    def mmu(self) -> Mmu:
        assert self._mmu is not None, "AccessEmulator.attach() first"
        return self._mmu

    def forget_spans(self) -> None:
        """The memory map changed: no access under way is replayed from the old one."""
        self._read_span = self._write_span = None

    def _bus_read(self, addr: int, length: int) -> bytes | None:
        """vcpu_mmio_read: the vCPU's LAPIC first, then KVM_MMIO_BUS."""
        lapic = self._lapic
        if lapic is not None:
            data = lapic.read(addr, length)
            if data is not None:
                return data
        return self.vm.mmio_bus.read(addr, length)

    def _bus_write(self, addr: int, data: bytes) -> bool:
        """vcpu_mmio_write: the vCPU's LAPIC first, then KVM_MMIO_BUS."""
        lapic = self._lapic
        if lapic is not None and lapic.write(addr, data):
            return True
        return self.vm.mmio_bus.write(addr, data)

    # --- the MEM_READ / MEM_WRITE hooks: the whole access ---------------------------------------

    def on_read(self, uc: Uc, access: int, addr: int, size: int, value: int, _data: object) -> None:
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
            if self.mmu.region_at(gpa).kind not in MMIO_READ_KINDS:
                continue
            touched = True
            off = gpa - addr
            done = 0
            while done < length:
                n = min(length - done, _MMIO_CHUNK)
                data = self._bus_read(gpa + done, n)
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
                data = self._port.exit_to_user(exits.MmioRead(gpa + i, n), in_access=True)
                if data is not None:
                    buf[off + i : off + i + n] = data
        # Unicorn reads an unaligned access as two aligned ones of its size, [low, low + 2 * size).
        low = addr & ~(size - 1)
        self._read_span = (addr, addr + size, bytes(buf), low, max(low + 2 * size, addr + size))

    def on_write(self, uc: Uc, access: int, addr: int, size: int, value: int, _data: object) -> None:
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
        pieces = [(gpa, length, self.mmu.region_at(gpa)) for gpa, length in split_at_pages(addr, size)]
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
                if not self._bus_write(gpa + done, chunk[done : done + n]):
                    break
                done += n
            if done < length:
                fragments.append((gpa + done, chunk[done:]))
        for gpa, rest in fragments:
            for i in range(0, len(rest), _MMIO_CHUNK):
                self._port.exit_to_user(exits.MmioWrite(gpa + i, rest[i : i + _MMIO_CHUNK]), in_access=True)

    # --- Unicorn's own pieces: replayed from the span, or delivered when the hook left them ---------

    def _taken_by_write_hook(self, addr: int, size: int) -> bool:
        span = self._write_span
        return span is not None and span[0] <= addr and addr + size <= span[1]

    def _mmio_write(self, addr: int, data: bytes, *, in_access: bool, keep: tuple[int, int] | None) -> None:
        """vcpu_mmio_write for a store the write hook did not take whole (aligned, at most 4 bytes).

        From an mmio_map callback (in_access, `keep` its piece) or the write-protect hook (not).
        """
        if not self._bus_write(addr, data):
            self._port.exit_to_user(exits.MmioWrite(addr, data), in_access=in_access, keep=keep)

    def on_write_protected(
        self, uc: Uc, access: int, addr: int, size: int, value: int, _data: object
    ) -> bool:
        """A store to a READONLY / PCI_HOLE slot (Unicorn discards the store itself once we return).

        Unicorn calls this for the whole store and again for every byte of an unaligned one; the
        write hook has already delivered it (KVM_PFN_ERR_RO_FAULT -> emulator -> MMIO).
        """
        region = self.mmu.region_at(addr)
        if region.kind is RegionKind.RAM_HOST_READONLY:
            raise ModelKvmError(
                errno.EFAULT,
                "KVM_RUN",
                f"vcpu={self._vcpu_id}",
                f"write to {region.memslot.describe()} whose host pages are read-only",
            )
        if not self._taken_by_write_hook(addr, size):
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._mmio_write(addr, data, in_access=False, keep=None)
        return True

    def on_mmio_write(self, uc: Uc, offset: int, size: int, value: int, base: int) -> None:
        addr = base + offset
        if not self._taken_by_write_hook(addr, size):
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._mmio_write(addr, data, in_access=True, keep=self.mmu.mmio_piece(base))

    def on_mmio_read(self, uc: Uc, offset: int, size: int, base: int) -> int:
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
        data = self._bus_read(addr, size)
        if data is None:
            data = self._port.exit_to_user(
                exits.MmioRead(addr, size), in_access=True, keep=self.mmu.mmio_piece(base)
            )
            if data is None:
                return 0
        return int.from_bytes(data, "little")

    # --- slots whose host pages are not mapped ---------------------------------------------------

    def on_bad_hva(self, uc: Uc, offset: int, size: int, region: GuestRegion) -> int:
        """KVM_RUN fails with EFAULT (hva_to_pfn finds nothing there); emu_start stops, run() raises."""
        self._port.fail(
            uc,
            ModelKvmError(
                errno.EFAULT,
                "KVM_RUN",
                f"vcpu={self._vcpu_id}",
                f"guest access to {region.memslot.describe()} whose userspace_addr "
                f"{region.memslot.userspace_addr:#x} is not mapped in this process",
            ),
        )
        return 0

    def on_bad_hva_write(self, uc: Uc, offset: int, size: int, value: int, region: GuestRegion) -> None:
        self.on_bad_hva(uc, offset, size, region)
