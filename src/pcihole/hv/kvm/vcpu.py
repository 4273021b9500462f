"""`Vcpu`: a KVM vCPU file descriptor and its mmapped `struct kvm_run`.

run() is the hot path (one call per exit, ~11 us round trip on this host's software KVM), so it
decodes kvm_run with struct.unpack_from at offsets derived once from the ctypes declaration rather
than through ctypes attribute access.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import threading

from pcihole.hv import exits, uapi
from pcihole.hv.ioctls import KvmIoctl
from pcihole.hv.kvm.c_run_loop import LOG_FULL, FillPages
from pcihole.hv.kvm.ioctl import KvmError, kvm_ioctl

R = uapi.KvmExitReason
_EXIT = uapi.kvm_run.exit.offset
_OFF_EXIT_REASON = uapi.kvm_run.exit_reason.offset
_OFF_MMIO = _EXIT + uapi.kvm_run_exit.mmio.offset
_OFF_MMIO_DATA = _OFF_MMIO + uapi.kvm_run_mmio.data.offset
_OFF_IO = _EXIT + uapi.kvm_run_exit.io.offset
_OFF_INTERNAL = _EXIT + uapi.kvm_run_exit.internal.offset
_OFF_SYSTEM_EVENT = _EXIT + uapi.kvm_run_exit.system_event.offset
_OFF_FAIL_ENTRY = _EXIT + uapi.kvm_run_exit.fail_entry.offset
_OFF_HW = _EXIT + uapi.kvm_run_exit.hw.offset
# struct kvm_run_mmio: u64 phys_addr, u8 data[8], u32 len, u8 is_write
_MMIO = struct.Struct("<Q8sIB")
# struct kvm_run_io: u8 direction, u8 size, u16 port, u32 count, u64 data_offset
_IO = struct.Struct("<BBHIQ")
_ENTRY = ctypes.sizeof(uapi.kvm_coalesced_mmio)
_RING_HEADER = ctypes.sizeof(uapi.kvm_coalesced_mmio_ring)
_RING_ENTRY = struct.Struct("<QII8s")
# struct kvm_coalesced_mmio_ring: u32 first, u32 last (then the entries)
_RING_INDICES = struct.Struct("<II")
_EXIT_REASON = struct.Struct("<I")
# The two reasons a scan produces by the thousand, as plain ints: comparing with an IntEnum member
# costs an attribute lookup on the enum class per exit.
_EXIT_MMIO = int(R.KVM_EXIT_MMIO)
_EXIT_IO = int(R.KVM_EXIT_IO)
_OFF_IMMEDIATE_EXIT = uapi.kvm_run.immediate_exit.offset
_OFF_REQUEST_INTERRUPT_WINDOW = uapi.kvm_run.request_interrupt_window.offset

# The signal kick() sends to a vCPU thread sitting in KVM_RUN, so that KVM_RUN returns EINTR (QEMU's
# SIG_IPI). Its handler does nothing; it only has to exist, or the signal would kill the process.
KICK_SIGNAL = signal.SIGUSR1


def _install_kick_handler() -> None:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(KICK_SIGNAL) in (
        signal.SIG_DFL,
        None,
    ):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class Vcpu:
    """One vCPU. `run()` returns a decoded exit (hv/exits.py); reads are answered by complete_read()."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int, coalesced_ring_page: int) -> None:
        self.fd = fd
        self.id = vcpu_id
        self._run = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The coalesced-MMIO ring is one page of the same mapping, at the page offset that
        # KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO) returns (2 on x86); 0 means no ring.
        self._ring = coalesced_ring_page * uapi.PAGE_SIZE if coalesced_ring_page else 0
        # (offset in kvm_run, length) where the data of a pending MmioRead / IoIn must be written.
        self._pending_read: tuple[int, int] | None = None
        self._running_thread: int | None = None
        # kvm_run's address for the C loop (run_answering), taken on first use: the ctypes view
        # holds an export of the mmap, dropped in close() before the mmap is closed.
        self._run_view: ctypes.c_char | None = None
        _install_kick_handler()

    # --- registers ---------------------------------------------------------------------------------

    def get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        kvm_ioctl(self.fd, KvmIoctl.KVM_GET_REGS, regs, f"vcpu={self.id}")
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        kvm_ioctl(self.fd, KvmIoctl.KVM_SET_REGS, regs, f"vcpu={self.id}")

    def get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        kvm_ioctl(self.fd, KvmIoctl.KVM_GET_SREGS, sregs, f"vcpu={self.id}")
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        kvm_ioctl(self.fd, KvmIoctl.KVM_SET_SREGS, sregs, f"vcpu={self.id}")

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        kvm_ioctl(self.fd, KvmIoctl.KVM_SET_CPUID2, cpuid, f"vcpu={self.id}, nent={cpuid.nent}")

    def set_msrs(self, msrs: dict[int, int]) -> None:
        req = uapi.msrs_with(len(msrs))()
        req.nmsrs = len(msrs)
        for i, (index, value) in enumerate(msrs.items()):
            req.entries[i].index = index
            req.entries[i].data = value
        done = kvm_ioctl(
            self.fd, KvmIoctl.KVM_SET_MSRS, req, f"vcpu={self.id}, msrs={[hex(m) for m in msrs]}"
        )
        if done != len(msrs):
            bad = list(msrs)[done]
            raise KvmError(errno.EINVAL, KvmIoctl.KVM_SET_MSRS, f"vcpu={self.id}: MSR {bad:#x} refused")

    def request_interrupt_window(self, on: bool) -> None:
        """kvm_run.request_interrupt_window: KVM_RUN returns IrqWindowOpen once the guest can take
        an external interrupt (what QEMU sets while its userspace PIC has one pending)."""
        self._run[_OFF_REQUEST_INTERRUPT_WINDOW] = int(on)

    def nmi(self) -> None:
        """KVM_NMI (no in-kernel irqchip): KVM delivers an NMI at the next entry where NMIs are
        not blocked (after the IRET that ends the handler of the last one)."""
        kvm_ioctl(self.fd, KvmIoctl.KVM_NMI)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT without an in-kernel irqchip: KVM injects `vector` at the next entry,
        whatever RFLAGS.IF says (kvm_queue_interrupt): the VMM waits for the interrupt window
        (request_interrupt_window, IrqWindowOpen) first, as QEMU does."""
        kvm_ioctl(
            self.fd, KvmIoctl.KVM_INTERRUPT, uapi.kvm_interrupt(irq=vector), f"vcpu={self.id}, irq={vector}"
        )

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        req = uapi.msrs_with(len(indices))()
        req.nmsrs = len(indices)
        for i, index in enumerate(indices):
            req.entries[i].index = index
        done = kvm_ioctl(self.fd, KvmIoctl.KVM_GET_MSRS, req, f"vcpu={self.id}")
        return {req.entries[i].index: req.entries[i].data for i in range(done)}

    def set_fpu(self, fpu: uapi.kvm_fpu) -> None:
        kvm_ioctl(self.fd, KvmIoctl.KVM_SET_FPU, fpu, f"vcpu={self.id}")

    def get_lapic(self) -> uapi.kvm_lapic_state:
        state = uapi.kvm_lapic_state()
        kvm_ioctl(self.fd, KvmIoctl.KVM_GET_LAPIC, state, f"vcpu={self.id}")
        return state

    def set_lapic(self, state: uapi.kvm_lapic_state) -> None:
        kvm_ioctl(self.fd, KvmIoctl.KVM_SET_LAPIC, state, f"vcpu={self.id}")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_HALTED (in HLT, in-kernel LAPIC), ..."""
        state = uapi.kvm_mp_state()
        kvm_ioctl(self.fd, KvmIoctl.KVM_GET_MP_STATE, state, f"vcpu={self.id}")
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        kvm_ioctl(
            self.fd, KvmIoctl.KVM_SET_MP_STATE, uapi.kvm_mp_state(mp_state), f"vcpu={self.id}, {mp_state}"
        )

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        events = uapi.kvm_vcpu_events()
        kvm_ioctl(self.fd, KvmIoctl.KVM_GET_VCPU_EVENTS, events, f"vcpu={self.id}")
        return events

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        kvm_ioctl(self.fd, KvmIoctl.KVM_SET_VCPU_EVENTS, events, f"vcpu={self.id}")

    def translate(self, linear_address: int) -> int | None:
        """KVM_TRANSLATE: the guest-physical address of a guest-virtual one, None if unmapped."""
        tr = uapi.kvm_translation(linear_address=linear_address)
        kvm_ioctl(self.fd, KvmIoctl.KVM_TRANSLATE, tr, f"vcpu={self.id}, la={linear_address:#x}")
        return tr.physical_address if tr.valid else None

    # --- running -----------------------------------------------------------------------------------

    def run(self) -> exits.VcpuExit:
        """KVM_RUN, then decode why the vCPU stopped. A pending read must be completed first."""
        self._running_thread = threading.get_ident()
        try:
            kvm_ioctl(self.fd, KvmIoctl.KVM_RUN)
        except KvmError as e:
            if e.errno == errno.EINTR:
                self._run[_OFF_IMMEDIATE_EXIT] = 0
                return exits.Interrupted()
            raise
        finally:
            self._running_thread = None
        return self._decode()

    def run_answering(self, fill_pages: FillPages) -> exits.VcpuExit:
        """run(), with the C loop (c_run_loop.py, run_loop.c) answering the reads of `fill_pages`'
        absent and mirrored pages itself, between KVM_RUNs, until an exit it leaves to Python. The
        reads it answered are handed to `fill_pages`' sinks before this returns (and whenever its
        log fills)."""
        if self._run_view is None:
            self._run_view = ctypes.c_char.from_buffer(self._run)
        run_c, fd, table = fill_pages.loop.run, self.fd, fill_pages.table_ref
        address, ring = ctypes.addressof(self._run_view), self._ring
        self._running_thread = threading.get_ident()
        try:
            while (ret := run_c(fd, address, ring, table)) == LOG_FULL:
                fill_pages.flush()
        finally:
            self._running_thread = None
            fill_pages.flush()
        if ret < 0:
            if -ret == errno.EINTR:
                self._run[_OFF_IMMEDIATE_EXIT] = 0
                return exits.Interrupted()
            raise KvmError(-ret, KvmIoctl.KVM_RUN, "from the C run loop")
        return self._decode()

    def kick(self) -> None:
        """Make KVM_RUN return EINTR: immediate_exit covers a kick that lands just before KVM_RUN
        (api.rst, KVM_CAP_IMMEDIATE_EXIT), the signal one that lands while the vCPU runs."""
        self._run[_OFF_IMMEDIATE_EXIT] = 1
        thread = self._running_thread
        if (
            thread is not None
            and thread != threading.get_ident()
            and signal.getsignal(KICK_SIGNAL)
            not in (
                signal.SIG_DFL,
                None,
            )
        ):
            signal.pthread_kill(thread, KICK_SIGNAL)

    def _decode(self) -> exits.VcpuExit:
        run = self._run
        (reason,) = _EXIT_REASON.unpack_from(run, _OFF_EXIT_REASON)
        if reason == _EXIT_MMIO:
            addr, data, length, is_write = _MMIO.unpack_from(run, _OFF_MMIO)
            if is_write:
                return exits.MmioWrite(addr, data[:length])
            self._pending_read = (_OFF_MMIO_DATA, length)
            return exits.MmioRead(addr, length)
        if reason == _EXIT_IO:
            direction, size, port, count, data_offset = _IO.unpack_from(run, _OFF_IO)
            if direction == uapi.KVM_EXIT_IO_OUT:
                return exits.IoOut(port, size, bytes(run[data_offset : data_offset + size * count]), count)
            self._pending_read = (data_offset, size * count)
            return exits.IoIn(port, size, count)
        if reason == R.KVM_EXIT_HLT:
            return exits.Hlt()
        if reason == R.KVM_EXIT_IRQ_WINDOW_OPEN:
            return exits.IrqWindowOpen()
        if reason == R.KVM_EXIT_SHUTDOWN:
            return exits.Shutdown()
        if reason == R.KVM_EXIT_INTR:
            return exits.Interrupted()
        if reason == R.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = struct.unpack_from("<II", run, _OFF_INTERNAL)
            data = struct.unpack_from(f"<{min(ndata, 16)}Q", run, _OFF_INTERNAL + 8)
            return exits.InternalError(suberror, data)
        if reason == R.KVM_EXIT_FAIL_ENTRY:
            hw_reason, cpu = struct.unpack_from("<QI", run, _OFF_FAIL_ENTRY)
            return exits.FailEntry(hw_reason, cpu)
        if reason == R.KVM_EXIT_SYSTEM_EVENT:
            type_, ndata = struct.unpack_from("<II", run, _OFF_SYSTEM_EVENT)
            data = struct.unpack_from(f"<{min(ndata, 16)}Q", run, _OFF_SYSTEM_EVENT + 8)
            return exits.SystemEvent(type_, data)
        return exits.Unknown(reason)

    def complete_read(self, data: bytes) -> None:
        """Write the bytes the guest reads for the pending MmioRead / IoIn into kvm_run."""
        if self._pending_read is None:
            raise RuntimeError(f"vcpu {self.id}: complete_read() without a pending MMIO or port-I/O read")
        offset, length = self._pending_read
        if len(data) != length:
            raise ValueError(f"vcpu {self.id}: the pending read wants {length} bytes, got {len(data)}")
        self._run[offset : offset + length] = data
        self._pending_read = None

    def drain_coalesced_mmio(self) -> list[exits.CoalescedWrite]:
        """Consume the coalesced-MMIO ring from `first` to `last` (virt/kvm/coalesced_mmio.c).

        Called between KVM_RUNs of the only vCPU, so no barrier is needed against the producer.
        """
        if not self._ring:
            return []
        run, base = self._run, self._ring
        first, last = _RING_INDICES.unpack_from(run, base)
        if first == last:
            return []
        out: list[exits.CoalescedWrite] = []
        while first != last:
            addr, length, pio, data = _RING_ENTRY.unpack_from(run, base + _RING_HEADER + first * _ENTRY)
            out.append(exits.CoalescedWrite(addr, data[:length], bool(pio)))
            first = (first + 1) % uapi.KVM_COALESCED_MMIO_MAX
        struct.pack_into("<I", run, base, first)
        return out

    def ring_indices(self) -> tuple[int, int]:
        """(first, last) of the coalesced ring; tests use it as the kernel's selftest does."""
        return struct.unpack_from("<II", self._run, self._ring) if self._ring else (0, 0)

    def set_ring_indices(self, first: int, last: int) -> None:
        """Write the ring's first/last as userspace may (the kernel's coalesced_io_test sets both)."""
        if self._ring:
            struct.pack_into("<II", self._run, self._ring, first, last)

    def close(self) -> None:
        if self.fd >= 0:
            self._run_view = None  # the export of the mmap (run_answering)
            self._run.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
