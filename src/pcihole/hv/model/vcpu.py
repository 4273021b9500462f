"""`ModelVcpu`: KVM_RUN on Unicorn, with exits delivered from inside Unicorn's callbacks by greenlet.

The model's counterpart of the vCPU half of virt/kvm/kvm_main.c (kvm_vcpu_ioctl: KVM_RUN,
KVM_GET/SET_REGS and SREGS; kvm_vcpu_kick) and of arch/x86/kvm/x86.c's vcpu_run loop. The rest of
x86.c's and the MMU's work is in the modules it drives:
- mmu.py: Unicorn's memory map, built from the memslots (arch/x86/kvm/mmu/mmu.c);
- emulator_read_write.py: accesses that leave RAM, cut and delivered as emulator_read_write does;
- boundary_hook.py: how another thread stops the vCPU at an instruction boundary (kvm_vcpu_kick);
- instruction_hooks.py: CPUID from KVM_SET_CPUID2's table, RDTSC / RDTSCP from the guest TSC;
- intercept_exits.py: the guest's RDMSR / WRMSR and HLT, stopped by the engine's SVM intercepts;
- pending_events.py: KVM_INTERRUPT, KVM_NMI, the interrupt window, the in-kernel interrupt source
  and the sleep in HLT, asked between runs, at instruction boundaries and while halted;
- mid_instruction_exit.py: KVM_SET_REGS during an MMIO / port-I/O exit, and the MMIO replay;
  instruction_length.py: RIP past an MMIO write, as KVM reports it;
- long_mode_switch.py: the 64-bit engine that replaces a 32-bit one the guest took into long mode;
- special_registers.py, live_sregs.py: KVM_GET_SREGS / KVM_SET_SREGS, segments' hidden parts included;
- cpu.py: the engine and the registers.

A KVM vCPU stops in the middle of an instruction to ask userspace for the value of an MMIO read or
an IN, and finishes the instruction on the next KVM_RUN. The model does the same without leaving
Unicorn: `run()` switches into a greenlet that runs `emu_start`; a callback that needs userspace
switches back out with the exit (run() returns it), and the next run() switches in again with the
bytes complete_read() supplied, which the callback returns to Unicorn (~1 us per exit). HLT is one
of those too (the SVM HLT intercept, msr_intercept.py), since every return from emu_start flushes
the translation cache. Exits that end an instruction stream (a triple fault, a new engine) stop
`emu_start`; the greenlet reports them and, on the next run(), starts emulating again from the
current RIP.

Where the vCPU is, is one `VcpuState`: IDLE (outside emu_start), RUNNING (emulating), IN_EXIT
(inside emu_start, paused in a callback: run() returned its exit), CLOSING (leaving the engine for
good), CLOSED. What other threads ask of it are `Request`s, as KVM's vcpu->requests: KICK (the
running or next run() returns Interrupted), NEW_ENGINE (the first engine), RESTART (KVM_SET_SREGS
loaded the engine: live_sregs.py) and MODE_CHANGE (the guest took a 32-bit engine into long mode:
long_mode_switch.py); all are in vcpu_state.py.

Memslot changes are seen at once, also when another thread makes them while this vCPU runs: the
change arms the boundary hook, whose callback, at the start of the next translation block (an
instruction boundary), syncs the memory map in the vCPU's own thread and lets emulation go on; an
IN / OUT exit applies a change made during it at once. A change made during an MMIO exit is applied
at the next boundary, not in the middle of the access (Unicorn still holds the region and TLB entry
of the access), so the rest of that translation block runs on the old map. uc_emu_stop from
another thread is not used: Unicorn observes a stop request after any load or store and restarts
the interrupted instruction from its beginning, so an instruction like `incl (mem)` or an MMIO
access would run twice (kick() uses the boundary hook too).

A memslot change is also synchronous, as KVM_SET_USER_MEMORY_REGION is (synchronize_srcu): once it
returns, no vCPU uses the old slot's host pages, so the VMM may munmap them at once. Unicorn maps a
slot's pages zero-copy (mem_map_ptr) and keeps TLB entries pointing into them, so the thread that
changed the slots waits (sync_memslots) until every vCPU RUNNING in another thread has applied the
change at its next boundary; a vCPU IDLE or IN_EXIT applies it before the guest touches memory
again. On resuming from an exit the change is applied at once where Unicorn no longer uses the
region or TLB entry of the access under way: after IN / OUT, after a write-protect hook (the store
is then discarded), and after an mmio_map callback, whose own piece is kept mapped (as MMIO) until
the next boundary. Only an exit from the MEM_READ / MEM_WRITE hooks (an unaligned or 8-byte access
touching MMIO) leaves the rest of its translation block on the old map; such a guest must not have
a slot deleted under that block.

Exceptions, INT n, SYSCALL and the interrupts the VMM injects (KVM_INTERRUPT, KVM_NMI) or an
in-kernel source raises are delivered through the guest's IDT by interrupts.py, from Unicorn's
INTR / INSN_INVALID / SYSCALL hooks, from the boundary hook (at a block start) or between runs;
docs/model-system-cpu.md says how and what is left out. Where delivery is not possible (real mode,
no IDT, an engine whose hidden state engine_state.py cannot reach) an exception is a Shutdown.

Closing is the same rule at its strongest: the VMM frees guest RAM after closing the vCPU, and a
vCPU IN_EXIT is still inside emu_start with its translation block unfinished. close() therefore
makes the engine leave without running guest code over host pages: the paused callback, resumed
in CLOSING, unmaps what it safely can (everything but the MMIO piece under way, where the access
allows) and stops the engine, so the rest of the block faults instead of touching memory.
"""

from __future__ import annotations

import errno
import threading

from greenlet import getcurrent, greenlet
from unicorn import (
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    Uc,
    UcError,
)
from unicorn.x86_const import (
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_INS_SYSCALL,
    UC_X86_REG_CR2,
    UC_X86_REG_IDTR,
)

from pcihole.hv import exits
from pcihole.hv.model import cpu, special_registers
from pcihole.hv.model.boundary_hook import BoundaryHook
from pcihole.hv.model.cpu_msrs import EngineMsrs, guest_maxphyaddr, register_vcpu_msrs
from pcihole.hv.model.cpuid import CpuidTable
from pcihole.hv.model.emulator_read_write import AccessEmulator
from pcihole.hv.model.engine_state import EngineState, read_flags
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.instruction_hooks import InstructionHooks
from pcihole.hv.model.instruction_length import MAX_INSN_BYTES, WriteExit, code_at_rip, write_exit
from pcihole.hv.model.intercept_exits import InterceptExits
from pcihole.hv.model.interrupt_source import InterruptSource
from pcihole.hv.model.interrupts import (
    IF,
    UD,
    Delivery,
    Event,
    EventKind,
    TripleFault,
    syscall,
)
from pcihole.hv.model.kvmclock import KvmClock
from pcihole.hv.model.lapic import LocalApic
from pcihole.hv.model.live_sregs import LiveSregs
from pcihole.hv.model.long_mode_switch import LongModeSwitch
from pcihole.hv.model.mid_instruction_exit import MidInstructionExit, finish_pio
from pcihole.hv.model.mmu import Mmu
from pcihole.hv.model.msr import MsrFault, MsrTable
from pcihole.hv.model.msr_intercept import MsrIntercept
from pcihole.hv.model.pending_events import Due, PendingEvents
from pcihole.hv.model.tsc import TscClock
from pcihole.hv.model.vcpu_state import RESTARTS, Request, VcpuState
from pcihole.hv.uapi import (
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_RUNNABLE,
    kvm_fpu,
    kvm_lapic_state,
    kvm_regs,
    kvm_sregs,
)

_HLT_OPCODE = 0xF4
# CPUID leaf 1, ECX: X86_FEATURE_X2APIC, X86_FEATURE_TSC_DEADLINE_TIMER
CPUID_FEATURES = 1
CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
_SYSCALL_BYTES = 2  # 0f 05: Unicorn's helper_syscall adds it to RIP after the hook
KVM_NR_INTERRUPTS = 256


_LEFT = (VcpuState.CLOSING, VcpuState.CLOSED)


class _Closing:
    """Sent into a paused vCPU greenlet by close(): stop emulating and return."""


_CLOSING = _Closing()


class ModelVcpu:
    """One vCPU of a ModelVm. Same methods and semantics as the kvm backend's Vcpu."""

    def __init__(self, vm, vcpu_id: int) -> None:  # vm: ModelVm (import cycle)
        self.vm = vm
        self.id = vcpu_id
        self._regs = cpu.reset_regs()
        self._sregs = cpu.reset_sregs()
        # Notified at every state change and map sync: sync_memslots() and close() wait on it.
        self._sync = threading.Condition()
        self._state = VcpuState.IDLE
        self._requests: set[Request] = {Request.NEW_ENGINE}
        # The engine and what hangs off it; replaced together, under _engine_lock, which is how
        # other threads (kick, memslot changes) see them.
        self._engine_lock = threading.Lock()
        self._uc: Uc | None = None
        self._mode: cpu.CpuMode | None = None
        self._mmu: Mmu | None = None
        self._emulator: AccessEmulator | None = None
        self._boundary: BoundaryHook | None = None
        # The greenlet that runs emu_start, the thread it belongs to (the last run()'s), and the
        # thread inside emu_start right now (None outside it).
        self._guest: greenlet | None = None
        self._thread: int | None = None
        self._engine_thread: int | None = None
        # Why emu_start stopped, when a callback stopped it: the exit to report, or the error
        # KVM_RUN fails with.
        self._stop_exit: exits.VcpuExit | None = None
        self._fault: OSError | None = None
        self._pending_read: int | None = None  # bytes the pending MmioRead / IoIn wants
        # An exit mid-instruction, KVM_SET_REGS during it, its MMIO rerun (mid_instruction_exit.py).
        self._mid_exit = MidInstructionExit()
        self._read_data: bytes | None = None
        # Event delivery through the guest's IDT (interrupts.py), None where the engine's hidden
        # state is out of reach (engine_state.py) or the CPU is in real mode: every exception is
        # then a Shutdown, as for a guest with no IDT.
        self._delivery: Delivery | None = None
        self._engine_state: EngineState | None = None
        # KVM_INTERRUPT, KVM_NMI, the interrupt window, the in-kernel source and the HLT sleep
        # (pending_events.py).
        self._events = PendingEvents(
            self._requests, self._sync, self._request_boundary, self._deliver, lambda: self._state in _LEFT
        )
        # uc_emu_start calls (each return flushed the translation cache): tests bound it.
        self.engine_starts = 0
        # A 32-bit engine the guest took into long mode is replaced by a 64-bit one (long_mode_switch.py).
        self._long_mode = LongModeSwitch(self._requests, self._request_boundary)
        self._cr2_at_stop: int | None = None  # CR2 where a callback stopped the engine (_after_stop)
        #: The in-kernel LAPIC (lapic.py) where the VM has an irqchip, else None.
        self.lapic: LocalApic | None = None
        #: This vCPU's MSRs (msr.py): devices register the MSRs they own (the local APIC: APIC_BASE,
        #: x2APIC, TSC_DEADLINE); a guest access to an MSR nobody owns takes #GP(0).
        self.msrs = MsrTable()
        #: The guest TSC (tsc.py): RDTSC, IA32_TSC, and deadlines converted to host time.
        self.tsc = TscClock(vm.tsc_khz)
        # Guest RDMSR / WRMSR reach self.msrs through the engine's SVM MSR intercept
        # (msr_intercept.py), but for the MSRs the engine keeps itself (cpu_msrs.py).
        self._intercept = MsrIntercept()
        # The engine's state wherever its layout is known, real mode included (the MSR intercept,
        # KVM_GET_SREGS / KVM_SET_SREGS, the intercept exits); _engine_state is it outside real mode.
        self._msr_state: EngineState | None = None
        self.engine_msrs = EngineMsrs(self._msr_engine, self._intercept.native, lambda: self._sregs)
        self._live_sregs = LiveSregs(self._requests, self._request_boundary, self.engine_msrs)  # set_sregs
        #: kvmclock (kvmclock.py): how Linux learns the TSC frequency.
        self.kvmclock = KvmClock(self.tsc, vm.write_guest, vm.read_guest)
        # CPUID from KVM_SET_CPUID2's table, RDTSC / RDTSCP from self.tsc (instruction_hooks.py).
        self._instructions = InstructionHooks(self.msrs, self.tsc, self.engine_msrs)
        register_vcpu_msrs(
            self.msrs,
            self.engine_msrs,
            self.tsc,
            vcpu_id,
            self.kvmclock.update,
            cpuid=lambda: self._instructions.cpuid,
            cr0=lambda: self.get_sregs().cr0,
        )
        self.kvmclock.register(self.msrs)
        self._intercept.pass_through(self.engine_msrs.pass_through())
        self._fpu: kvm_fpu | None = None  # KVM_SET_FPU's control words, loaded into each engine
        # What the intercept's exits do: RDMSR / WRMSR through self.msrs, HLT (intercept_exits.py).
        self._intercept_exits = InterceptExits(
            self.msrs, self._instructions.write_gprs, self._deliver, self._on_hlt
        )

    # --- registers ---------------------------------------------------------------------------------

    def _live_engine(self) -> tuple[Uc, cpu.CpuMode] | None:
        """The engine that holds the registers, if one does (else self._regs holds them)."""
        uc, mode = self._uc, self._mode
        if uc is None or mode is None or Request.NEW_ENGINE in self._requests:
            return None
        return uc, mode

    def get_regs(self) -> kvm_regs:
        engine = self._live_engine()
        if engine is None:
            return kvm_regs.from_buffer_copy(self._regs)
        regs = cpu.read_regs(*engine, self._engine_state)
        self._mid_exit.kvm_view(regs)  # an MMIO write finished, as KVM's emulator has it
        return regs

    def _rip(self) -> int:
        """get_regs().rip, reading RIP alone (cpu.read_rip)."""
        engine = self._live_engine()
        if engine is not None:
            return cpu.read_rip(*engine, self._engine_state)
        return self._regs.rip

    def set_regs(self, regs: kvm_regs) -> None:
        self._regs = kvm_regs.from_buffer_copy(regs)
        engine = self._live_engine()
        if engine is not None:  # RIP waits for the end of an exit mid-instruction (exit_to_user)
            regs, rip = self._mid_exit.registers_set(self._regs, self._state is VcpuState.IN_EXIT)
            cpu.write_regs(*engine, regs, self._engine_state, rip=rip)

    def get_sregs(self) -> kvm_sregs:
        engine, state, pending = self._live_engine(), self._msr_state, self._live_sregs.pending
        if engine is None or state is None or pending is not None:
            return kvm_sregs.from_buffer_copy(self._sregs if pending is None else pending)
        return special_registers.read_sregs(engine[0], state, self._sregs)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        mode = cpu.cpu_mode(sregs)  # refuse, here and now, a state the model cannot run
        self.engine_msrs.sregs_set()
        engine, state = self._live_engine(), self._msr_state
        self._sregs = kvm_sregs.from_buffer_copy(sregs)  # (what the engine does not hold: APIC base)
        if engine is None or state is None:
            self._requests.add(Request.NEW_ENGINE)
        elif not special_registers.engine_holds(self.get_sregs(), sregs):
            # Into the engine, which keeps the instruction under way (live_sregs.py).
            self._live_sregs.set(engine[0], state, sregs, mode, self._mid_exit.state_set())

    def set_cpuid2(self, cpuid) -> None:
        """KVM_SET_CPUID2: from now on the guest's CPUID is answered from this table, as kvm_cpuid
        does (cpuid.py). Before any table is set, every leaf answers zeros, as kvm_cpuid does
        with no entries."""
        table = CpuidTable.from_cpuid2(cpuid)
        engine = self._live_engine()
        self._instructions.set_cpuid(table, None if engine is None else engine[0])
        lapic = self.lapic
        if lapic is not None:
            # what KVM derives for the LAPIC (kvm_vcpu_after_set_cpuid): timer modes, x2APIC, MAXPHYADDR
            features = table.find(CPUID_FEATURES, None)
            ecx = 0 if features is None else features.ecx
            lapic.set_cpuid(
                x2apic=bool(ecx & CPUID_1_ECX_X2APIC),
                tsc_deadline=bool(ecx & CPUID_1_ECX_TSC_DEADLINE),
                maxphyaddr=guest_maxphyaddr(table),
            )

    # --- MSRs (msr.py, cpu_msrs.py) and the FPU ----------------------------------------------------

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the values of `indices` up to the first one the vCPU does not have
        (msr_io stops there and returns the number done; the dict holds those)."""
        out: dict[int, int] = {}
        for index in indices:
            try:
                out[index] = self.msrs.read(index, host=True)
            except MsrFault:
                break
        return out

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS: each in order; the first refused one ends it, as the kvm backend reports
        (EINVAL naming the MSR, after the ones before it were set)."""
        for index, value in msrs.items():
            try:
                self.msrs.write(index, value, host=True)
            except MsrFault as e:
                raise ModelKvmError(
                    errno.EINVAL, "KVM_SET_MSRS", f"vcpu={self.id}", f"MSR {index:#x} refused: {e}"
                ) from e

    def set_fpu(self, fpu: kvm_fpu) -> None:
        """KVM_SET_FPU: the x87 control word and MXCSR (the registers' contents are not modelled)."""
        self._fpu = kvm_fpu.from_buffer_copy(fpu)
        engine = self._live_engine()
        if engine is not None:
            cpu.write_fpu(engine[0], self._fpu)

    def _msr_engine(self) -> Uc | None:
        engine = self._live_engine()
        return None if engine is None else engine[0]

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
        if self._state in _LEFT:
            self._unwind()  # close() from another thread left this thread's greenlet to end here
            raise ModelKvmError(errno.EBADF, "KVM_RUN", f"vcpu={self.id}", "the vCPU is closed")
        resume: bytes | None = None
        if self._pending_read is not None:
            # Like KVM, which re-enters with whatever kvm_run holds, a read nobody completed reads as
            # zeros here (the kvm backend's kvm_run would hold stale bytes).
            resume = self._read_data if self._read_data is not None else bytes(self._pending_read)
            self._pending_read = None
            self._read_data = None
        if Request.KICK in self._requests and self._state is not VcpuState.IN_EXIT and resume is None:
            # KVM_RUN with immediate_exit set returns EINTR before entering the guest.
            self._requests.discard(Request.KICK)
            return exits.Interrupted()
        self._thread = threading.get_ident()
        if self._guest is None or self._guest.dead:
            self._guest = greenlet(self._guest_loop)
        self._guest.parent = getcurrent()
        exit_ = self._guest.switch(resume)
        if exit_ is None:  # the greenlet ended: close() was called meanwhile (from another thread)
            raise ModelKvmError(errno.EBADF, "KVM_RUN", f"vcpu={self.id}", "the vCPU was closed")
        return exit_

    def complete_read(self, data: bytes) -> None:
        if self._pending_read is None:
            raise RuntimeError(f"vcpu {self.id}: complete_read() without a pending MMIO or port-I/O read")
        if len(data) != self._pending_read:
            raise ValueError(
                f"vcpu {self.id}: the pending read wants {self._pending_read} bytes, got {len(data)}"
            )
        self._read_data = bytes(data)

    def kick(self) -> None:
        """Make the running (or the next) run() return Interrupted, like the kvm backend's kick.

        Any thread may call it: the running vCPU stops at the next instruction boundary (see
        boundary_hook.py for why not uc_emu_stop, which may run an instruction twice).
        """
        self._requests.add(Request.KICK)
        self._request_boundary()
        with self._sync:
            self._sync.notify_all()  # a vCPU sleeping in HLT wakes

    def attach_interrupt_source(self, source: InterruptSource) -> None:
        """An in-kernel interrupt controller (interrupt_source.py): from now on HLT sleeps in run()
        until the source has an interrupt the guest can take, as with KVM's in-kernel LAPIC."""
        self._events.source = source

    def attach_lapic(self, lapic: LocalApic) -> None:
        """The in-kernel LAPIC (lapic.py) of a VM with KVM_CREATE_IRQCHIP: asked before the MMIO bus
        (vcpu_mmio_read / vcpu_mmio_write), the owner of its MSRs, and the interrupt source."""
        self.lapic = lapic
        lapic.register_msrs(self.msrs)
        self.attach_interrupt_source(lapic)

    def get_lapic(self) -> kvm_lapic_state:
        """KVM_GET_LAPIC: the register page; EINVAL without an in-kernel LAPIC (kvm_arch_vcpu_ioctl)."""
        lapic = self._require_lapic("KVM_GET_LAPIC")
        return kvm_lapic_state.from_buffer_copy(lapic.get_state())

    def set_lapic(self, state: kvm_lapic_state) -> None:
        """KVM_SET_LAPIC (kvm_apic_set_state)."""
        lapic = self._require_lapic("KVM_SET_LAPIC")
        lapic.set_state(bytes(state))

    def _require_lapic(self, ioctl: str) -> LocalApic:
        if self.lapic is None:
            raise ModelKvmError(
                errno.EINVAL, ioctl, f"vcpu={self.id}", "no in-kernel LAPIC (KVM_CREATE_IRQCHIP)"
            )
        return self.lapic

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: HALTED while asleep in HLT (in-kernel LAPIC), else RUNNABLE."""
        return KVM_MP_STATE_HALTED if self._events.halted else KVM_MP_STATE_RUNNABLE

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE: RUNNABLE wakes a halted vCPU (it goes on after its HLT); HALTED puts
        it to sleep at the next entry. Other states (INIT, SIPI) are not modelled: EINVAL."""
        if mp_state == KVM_MP_STATE_RUNNABLE:
            self._events.halted = False
        elif mp_state == KVM_MP_STATE_HALTED and self._events.source is not None:
            self._events.halted = True
        else:
            raise ModelKvmError(errno.EINVAL, "KVM_SET_MP_STATE", f"vcpu={self.id}, {mp_state}")

    def interrupt_pending(self) -> None:
        """The source has a new interrupt (any thread): kvm_vcpu_kick after the LAPIC set IRR. The
        vCPU delivers it at its next instruction boundary where IF is set and no STI / MOV SS
        shadow is in force, or wakes from HLT to do so."""
        self._events.wake()

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT without an in-kernel irqchip (kvm_vcpu_ioctl_interrupt, kvm_queue_interrupt).

        `vector` is delivered through the IDT at the next entry, whatever RFLAGS.IF says (the VMM
        waits for the interrupt window first: request_interrupt_window). A second call before
        that entry replaces the first, as in the kernel; EINVAL for a vector >= 256. Called
        while paused in an exit from the middle of a translation block (an MMIO access, IN /
        OUT), the model delivers it at the next block start, a few instructions later than KVM,
        which delivers it right after the exiting instruction (Unicorn cannot stop in between).
        """
        if not 0 <= vector < KVM_NR_INTERRUPTS:
            raise ModelKvmError(errno.EINVAL, "KVM_INTERRUPT", f"vcpu={self.id}, irq={vector}")
        self._events.queue_interrupt(vector)

    def nmi(self) -> None:
        """KVM_NMI (no in-kernel irqchip): an NMI (vector 2, whatever IF says) at the next entry or
        instruction boundary where NMIs are not blocked: delivering one blocks them until the
        next IRET (SDM 6.7.1; QEMU's HF2_NMI_MASK, which its IRET clears). Wakes a halted vCPU."""
        self._events.queue_nmi()

    def request_interrupt_window(self, on: bool) -> None:
        """kvm_run.request_interrupt_window: run() returns IrqWindowOpen once the guest can take an
        external interrupt (RFLAGS.IF set, no STI / MOV SS shadow), at an instruction boundary."""
        self._events.request_window(on)

    def _set_state(self, state: VcpuState) -> None:
        """Move to `state` (the caller holds _sync) and wake whoever waits on a state change."""
        self._state = state
        self._sync.notify_all()

    def _request_boundary(self) -> None:
        with self._engine_lock:
            if self._boundary is not None and self._state is not VcpuState.CLOSED:
                self._boundary.arm()

    def _guest_loop(self, _resume: object) -> None:
        """The body of the guest greenlet: emulate, report stop exits, until close()."""
        while self._state not in _LEFT:
            exit_ = self._emulate()
            if exit_ is None:
                continue  # stopped to rebuild; emulate again from the current RIP
            guest = self._guest
            assert guest is not None and guest.parent is not None
            guest.parent.switch(exit_)

    def _emulate(self) -> exits.VcpuExit | None:
        # RUNNING before the map is brought up to date: a change committed from now on either is in
        # the map built below or waits for this vCPU's boundary (sync_memslots).
        with self._sync:
            if self._state in _LEFT:
                return None
            self._set_state(VcpuState.RUNNING)
            self._engine_thread = threading.get_ident()
        try:
            return self._emulate_in_engine()
        finally:
            with self._sync:
                self._engine_thread = None
                if self._state is VcpuState.RUNNING:
                    self._set_state(VcpuState.IDLE)
                else:
                    self._sync.notify_all()  # CLOSING: close() in another thread waits for this

    def _emulate_in_engine(self) -> exits.VcpuExit | None:
        uc, mode = self._prepare_engine()
        with self._engine_lock:
            if Request.KICK in self._requests or self._state in _LEFT or self._events.wanted():
                # A kick or close() from another thread that found no engine to arm (it was being
                # built): stop at the first instruction boundary instead of losing it.
                assert self._boundary is not None
                self._boundary.arm()
        self._stop_exit = None
        events, state = self._events, self._engine_state
        if events.halted and events.nmi_pending and events.nmi_allowed(state):
            events.halted = False
        if events.halted:
            # Still halted (a kick woke the last run()): sleep on.
            exit_ = events.halt(uc, state, self._mmu)
            if exit_ is not None or events.halted:
                return exit_
        # An exception the old engine deferred first, then one event (an exception is injected
        # before any NMI or interrupt: kvm_check_and_inject_events); the source's waits for the
        # first block start (the boundary, armed above).
        event = self._long_mode.take_deferred()
        if event is not None and not self._deliver(uc, event):
            return self._stop_exit  # the delivery triple-faulted: Shutdown
        due = events.due(uc, state, source=False)
        if due is Due.WINDOW:
            return exits.IrqWindowOpen()
        if due is not None and not events.deliver(uc, state, due):
            return self._stop_exit  # the delivery triple-faulted: Shutdown
        try:
            try:
                self.engine_starts += 1
                uc.emu_start(cpu.program_counter(uc, mode), (1 << 64) - 1)
            finally:
                if self._state not in _LEFT:
                    self._after_stop(uc)
        except UcError as e:
            if self._state in _LEFT:
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
        if self._state in _LEFT:
            return None
        if self._stop_exit is not None:
            return self._stop_exit  # a triple fault, or Interrupted (a kick, at a boundary)
        if self._mid_exit.replay_pending:
            return None  # an MMIO instruction to run again (exit_to_user): from the current RIP
        if not RESTARTS.isdisjoint(self._requests):
            return None  # stopped at a boundary to start again or rebuild: _prepare_engine does
        boundary = self._boundary
        if boundary is not None and not boundary.precise and boundary.armed:
            # The fallback's uc_emu_stop (boundary_hook.py) stopped us, maybe before the boundary.
            boundary.armed = False
            if Request.KICK in self._requests:
                self._requests.discard(Request.KICK)
                return exits.Interrupted()
            return None  # stopped for nothing the caller must see: go on
        # Otherwise emu_start returns by itself only after HLT (there is no end address or count),
        # which the intercept takes inside the engine (_on_hlt) wherever the engine state is in reach.
        if self._code_at_rip(uc, mode, -1, 1)[0] == bytes((_HLT_OPCODE,)):
            if events.source is None:
                return exits.Hlt()
            events.halted = True
            return events.halt(uc, self._engine_state, self._mmu)
        return exits.InternalError(KVM_INTERNAL_ERROR_EMULATION)

    def _at_boundary(self, uc: Uc) -> None:
        """The boundary hook's callback: in the vCPU thread, between two instructions."""
        if self._state in _LEFT:  # leave at once, without mapping memory the VMM may be about to free
            self._stop(uc)
            return
        mmu = self._mmu
        if mmu is not None and mmu.stale():
            mmu.sync(in_callback=True)
        if self._mode_changed(uc):
            # First, whatever else is asked (a kick stays requested for the new engine).
            self._long_mode.stop(uc)
        elif Request.KICK in self._requests:
            self._requests.discard(Request.KICK)
            # Returned to run()'s caller from here, the engine paused at this boundary as in an
            # I/O exit, not by stopping it: every return from emu_start flushes the translation
            # cache (the idle check's kick every 0.25 s cost a retranslation of the kernel's hot
            # code each time). The next run() resumes here.
            self.exit_to_user(exits.Interrupted())
            if self._state not in _LEFT and (self._events.wanted() or Request.KICK in self._requests):
                self._request_boundary()
        elif Request.RESTART in self._requests:
            self._stop(uc)
        elif self._events.at_boundary(uc, self._engine_state):
            self._stop_exit = exits.IrqWindowOpen()
            self._stop(uc)

    def _still_waiting_for_if(self, uc: Uc) -> bool:
        """At a block start, before _at_boundary: True if an interrupt still waits for RFLAGS.IF
        and nothing else is asked (no kick, memslot change, mode change, NMI, injection or window
        request), so the boundary hook stays armed without the callback. Linux runs long stretches
        with interrupts off (printk's console writes, spinlocks taken with irqsave) while its timer
        interrupt waits: this runs at each of those blocks."""
        mmu = self._mmu
        return (
            self._events.only_source_waits()
            and not self._requests
            and self._state is VcpuState.RUNNING
            and self._mode is not cpu.CpuMode.PROTECTED_32  # _mode_changed looks there
            and (mmu is None or not mmu.stale())
            and not read_flags(uc) & IF
        )

    def _deliver(self, uc: Uc, event: Event) -> bool:
        """Deliver `event` through the IDT; on a triple fault stop with Shutdown (False)."""
        delivery = self._delivery
        if delivery is None or uc.reg_read(UC_X86_REG_IDTR)[2] == 0:
            # No IDT: #GP, #DF, triple fault, which KVM reports as KVM_EXIT_SHUTDOWN.
            self._stop_exit = exits.Shutdown()
            self._stop(uc)
            return False
        try:
            delivery.deliver(event)
        except TripleFault:
            self._stop_exit = exits.Shutdown()
            self._stop(uc)
            return False
        return True

    # --- exits from inside Unicorn's callbacks -----------------------------------------------------

    def exit_to_user(
        self, exit_: exits.VcpuExit, *, in_access: bool = False, keep: tuple[int, int] | None = None
    ) -> bytes | None:
        """From inside a Unicorn callback: hand `exit_` to run()'s caller; return what it supplied.

        (emulator_read_write.ExitPort.) A memslot change made meanwhile is applied before returning
        to Unicorn where that is safe (module docstring): `in_access` is False after IN / OUT and a
        write-protect hook; `keep` is the piece [start, end) of the mmio_map callback under way,
        kept mapped as it is; an exit from the MEM_READ / MEM_WRITE hooks (in_access, no keep)
        leaves it to the next boundary.
        """
        uc, mmu = self._uc, self._mmu
        assert uc is not None and mmu is not None
        with self._sync:
            if self._state in _LEFT:  # closing from another thread: no more exits, leave the engine
                self._stop(uc)
                return None
            # In the same hold of _sync as the check: a close() in between would be overwritten.
            replayed, answer = self._mid_exit.take_replay(exit_)
            if not replayed:
                self._set_state(VcpuState.IN_EXIT)
        if replayed:
            return answer  # the instruction again, after KVM_SET_REGS in its exit (below)
        if isinstance(exit_, exits.MmioRead):
            self._pending_read = exit_.size
        elif isinstance(exit_, exits.IoIn):
            self._pending_read = exit_.size * exit_.count
        # In the middle of an instruction: what KVM_SET_REGS's RIP does (mid_instruction_exit.py).
        self._mid_exit.begin(exit_, self._rip, self._write_exit)
        guest = self._guest
        assert guest is not None and guest.parent is not None
        try:
            value = guest.parent.switch(exit_)
        finally:  # the last RIP KVM_SET_REGS set, where it moves the guest (_on_in drops an IN's data)
            replay, moved = self._mid_exit.end(exit_)
            if moved is not None and self._mode is not None and self._state not in _LEFT:
                cpu.write_regs(uc, self._mode, moved, self._engine_state)
            with self._sync:
                if self._state is VcpuState.IN_EXIT:
                    self._set_state(VcpuState.RUNNING)
        if replay and self._state not in _LEFT:
            # KVM_SET_REGS mid-access: generated code may hold guest registers in host ones, which
            # the rest of the block would write back over the VMM's. So the engine leaves, back at
            # the instruction's start (uc_exit_request_after_access -> cpu_loop_exit_restore), and
            # runs it again with the VMM's registers, its access answered from this exit as KVM's
            # emulator completes the one it decoded (complete_emulated_mmio). (New address registers
            # make a new exit for the new address; KVM's emulator finishes the decoded access.)
            self._mid_exit.replay_later(exit_, value)
            self._stop(uc)
        if self._state in _LEFT:
            # close() while paused in this exit: Unicorn must leave emu_start, and it first runs on
            # to its next exit check (after the next load or store, or at the end of the
            # translation block). The VMM may have freed guest RAM already, so where the access
            # under way allows it, nothing backed by host memory stays mapped: the next access
            # faults (the MMU refuses while leaving) instead of touching freed pages.
            if not in_access or keep is not None:
                mmu.tear_down(keep)
            self._stop(uc)
            return None
        if mmu.stale() and (not in_access or keep is not None):
            # The VMM may have freed the host pages of a deleted slot: none of the rest of this
            # translation block may reach them (the next boundary redoes a provisional map).
            mmu.sync(in_callback=True, keep=keep)
        if mmu.stale() or not RESTARTS.isdisjoint(self._requests):
            # In the middle of a memory access: Unicorn holds pointers into the region and the
            # TLB entry of the access under way (a map change frees the one and may resize the
            # TLB under the other), so the next instruction boundary applies the change, and
            # stops there for a new engine after set_sregs. The rest of the current translation
            # block (a few instructions at most) still runs with the old map or mode.
            self._request_boundary()
        return value  # bytes or None: what run()'s caller supplied

    def fail(self, uc: Uc, error: OSError) -> None:
        """(emulator_read_write.ExitPort.) KVM_RUN fails with `error` (the first one, if several)."""
        if self._fault is None:
            self._fault = error
        self._stop(uc)

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _data: object) -> None:
        """OUT: KVM_PIO_BUS devices (coalesced PIO zones), else KVM_EXIT_IO (kernel_pio)."""
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._mode_changed(uc)
        if not self.vm.pio_bus.write(port, data):
            self.exit_to_user(exits.IoOut(port, size, data))
            self._events_after_pio(uc, size, None)

    def _on_in(self, uc: Uc, port: int, size: int, _data: object) -> int:
        """IN: KVM_PIO_BUS devices (the in-kernel PICs, PIT, speaker), else KVM_EXIT_IO (kernel_pio)."""
        self._mode_changed(uc)
        data = self.vm.pio_bus.read(port, size)
        if data is not None:
            return int.from_bytes(data, "little")
        data = self.exit_to_user(exits.IoIn(port, size))
        if self._mid_exit.rip_moved:
            # complete_fast_pio_in: RIP moved off the IN, left undone, RAX as the VMM set it (the
            # engine leaves the block without storing this: engine/patches/0005).
            self._mid_exit.rip_moved = False
            return self._regs.rax & ((1 << (8 * size)) - 1)
        value = int.from_bytes(data or b"", "little")
        self._events_after_pio(uc, size, value)
        return value

    def _events_after_pio(self, uc: Uc, size: int, value: int | None) -> None:
        """Events queued in this IN / OUT exit come before the next instruction (finish_pio)."""
        if (mode := self._mode) is not None and self._state not in _LEFT and self._events.queued():
            code, bits = self._code_at_rip(uc, mode, 0, MAX_INSN_BYTES)
            finish_pio(uc, mode, self._engine_state, code, bits, size, value)

    def _on_interrupt(self, uc: Uc, intno: int, _data: object) -> None:
        """An exception or INT n, which Unicorn hands here instead of to the IDT: deliver it."""
        if self._intercept_exits.dispatch(uc, intno, self._msr_state):
            return  # an intercepted RDMSR / WRMSR or HLT (intercept_exits.py)
        state = self._engine_state
        if state is None:
            self._deliver(uc, Event(intno, EventKind.EXCEPTION))  # Shutdown
            return
        state.load()
        kind = EventKind.SOFTWARE if state.exception_is_int else EventKind.EXCEPTION
        event = Event(intno, kind, state.error_code)
        if self._mode_changed(uc):
            # This engine's register ids no longer reach RIP / RSP (cpu.live_mode): stop here (the
            # exception is between two instructions, RIP where the delivery wants it) and let the
            # engine of the new mode deliver it first thing.
            self._long_mode.stop(uc, deferred=event)
            return
        self._deliver(uc, event)

    def _on_hlt(self, uc: Uc) -> None:
        """HLT, intercepted and stepped over (intercept_exits.py): KVM_EXIT_HLT without an in-kernel
        source, or with one a sleep inside this callback until the source has an interrupt the
        guest can take (kvm_vcpu_halt). The engine does not leave emu_start for a wake-up, so its
        translation cache survives an idle guest's every tick."""
        # Only the sleep and the delivery happen here. What must reach run()'s caller (KVM_EXIT_HLT,
        # a kick's Interrupted) or change the memory map (memslots, close) leaves emu_start, and
        # _emulate_in_engine goes on (sleeping on in PendingEvents.halt): measured, pausing here for
        # an exit and closing the VM crashed the engine, which pausing in IN / OUT does not.
        events = self._events
        if events.source is None:
            self._stop_exit = exits.Hlt()
            self._stop(uc)
            return
        events.halted = True
        if self._mode_changed(uc):
            self._long_mode.stop(uc)  # the engine of the new mode sleeps on (_emulate_in_engine)
            return
        exit_ = events.halt(uc, self._engine_state, self._mmu, in_engine=True)
        if exit_ is not None:
            self._stop_exit = exit_  # a kick: run() returns Interrupted, the vCPU stays halted
        if events.halted or self._state in _LEFT:
            self._stop(uc)  # a kick, a memslot change or close

    def _on_invalid(self, uc: Uc, _data: object) -> bool:
        """#UD (Unicorn's stop_interrupt): True once delivered; False fails emu_start -> Shutdown."""
        if self._delivery is None or uc.reg_read(UC_X86_REG_IDTR)[2] == 0:
            return False
        if self._mode_changed(uc):  # as in _on_interrupt
            self._long_mode.stop(uc, deferred=Event(UD, EventKind.EXCEPTION))
            return True
        return self._deliver(uc, Event(UD, EventKind.EXCEPTION))

    def _on_syscall(self, uc: Uc, _data: object) -> None:
        """SYSCALL, which Unicorn's helper_syscall hands here instead of doing it (interrupts.py)."""
        state = self._engine_state
        if state is None:
            self._deliver(uc, Event(UD, EventKind.EXCEPTION))  # Shutdown
            return
        fault = syscall(uc, state, _SYSCALL_BYTES)
        if fault is not None and self._deliver(uc, fault):
            # helper_syscall adds the instruction length to RIP after this hook.
            uc.reg_write(state.regs.ip, uc.reg_read(state.regs.ip) - _SYSCALL_BYTES)

    # --- the engine, and memslot sync --------------------------------------------------------------

    def _prepare_engine(self) -> tuple[Uc, cpu.CpuMode]:
        """The engine to run, built if need be, with its memory map brought up to date."""
        uc, mode, mmu = self._uc, self._mode, self._mmu
        if uc is None or mode is None or mmu is None or Request.NEW_ENGINE in self._requests:
            mode = cpu.cpu_mode(self._sregs)
            uc = cpu.new_engine(mode, self._regs, self._sregs)
            mmu = self._install_engine(uc, mode)
        else:
            live = self._live_sregs.apply(uc, self._msr_state) or cpu.live_mode(uc, mode, self._msr_state)
            if live is not mode:
                # The guest changed mode itself (cpu.live_mode), or set_sregs did: its whole CPU state
                # moves into an engine of the new mode, whose register ids and emu_start reach all of it.
                old, uc, mode = uc, cpu.empty_engine(live), live
                mmu = self._install_engine(uc, mode, carry_from=old)
            self._requests.discard(Request.MODE_CHANGE)
        if mmu.stale():
            mmu.sync()
        else:
            # The VMM may have written guest code through the HVA since Unicorn translated it.
            # (ctl_flush_tb is in unicorn_py3's Uc; mypy reads the py2 binding's, which lacks it.)
            uc.ctl_flush_tb()  # type: ignore[attr-defined]
        return uc, mode

    def _install_engine(self, uc: Uc, mode: cpu.CpuMode, carry_from: Uc | None = None) -> Mmu:
        """Make `uc` this vCPU's engine: its memory map, exits, hooks and delivery; with
        `carry_from`, the CPU state of that engine (cpu.carry_state), once the fresh engine's
        layout is checked (EngineState.layout_ok wants a fresh engine)."""
        with self._engine_lock:
            self._uc, self._mode = uc, mode
            self._requests.discard(Request.NEW_ENGINE)
            self._requests.discard(Request.MODE_CHANGE)
            self._boundary = BoundaryHook(uc, self._at_boundary, self._still_waiting_for_if)
            self._emulator = AccessEmulator(self.vm, self, self.id, self.lapic)
            self._mmu = mmu = Mmu(self.vm, uc, self._emulator, self._sync, lambda: self._state in _LEFT)
            self._emulator.attach(uc, mmu)
            uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, UC_X86_INS_IN)
            uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, UC_X86_INS_OUT)
            uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
            uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
            self._delivery = self._engine_state = self._msr_state = None
            if mode is cpu.CpuMode.LONG_64:
                uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, UC_X86_INS_SYSCALL)
            state = EngineState(uc, long_mode=mode is cpu.CpuMode.LONG_64)
            layout_ok = state.layout_ok()
            if carry_from is not None:
                # The intercept below is turned on again for this engine (its pages are mapped
                # per engine).
                self._long_mode.carry(carry_from, uc, state, layout_ok)
            if layout_ok:
                # Where the engine's state is out of reach, its own helper_rdmsr / wrmsr do
                # every MSR (unknown ones read 0): the intercept needs that state.
                self._intercept.install(uc, state)
                self._msr_state = state
                if mode is not cpu.CpuMode.REAL:
                    self._engine_state = state
                    self._delivery = Delivery(uc, state, mmu.read_ram)
            if carry_from is None:
                self.engine_msrs.restore(uc)
                if self._fpu is not None:
                    cpu.write_fpu(uc, self._fpu)
            self._instructions.install(uc, mode, self._msr_state)
        return mmu

    def _mode_changed(self, uc: Uc) -> bool:
        """From a callback: True if the guest took this 32-bit engine into long mode; the vCPU then
        stops for an engine of the new mode (long_mode_switch.py)."""
        return self._long_mode.changed(uc, self._mode, self._engine_state)

    def _stop(self, uc: Uc) -> None:
        """uc_emu_stop from a callback, remembering CR2 for _after_stop."""
        self._cr2_at_stop = uc.reg_read(UC_X86_REG_CR2)
        uc.emu_stop()

    def _after_stop(self, uc: Uc) -> None:
        """Undo what Unicorn does to the CPU as emu_start returns. Measured (unicorn 2.1.4): it
        faults on the address before emu_start's end, (1 << 64) - 1 (a 32-bit engine: 0xffffffff),
        without calling any hook: CR2 reads 0xff..fe afterwards and QEMU's old_exception is #PF,
        which would make the guest's next #PF a #DF (check_exception). A guest kicked between a #PF
        and its handler's read of CR2 must still read the fault's address, as on KVM."""
        cr2, self._cr2_at_stop = self._cr2_at_stop, None
        if cr2 is not None:
            uc.reg_write(UC_X86_REG_CR2, cr2)
        state = self._engine_state
        if state is not None:
            state.load()
            state.clear_old_exception()
            state.store()

    def _code_at_rip(self, uc: Uc, mode: cpu.CpuMode, offset: int, size: int) -> tuple[bytes, int]:
        mmu = self._mmu
        assert mmu is not None
        return code_at_rip(uc, mode, self._engine_state, mmu.read_ram, offset, size)

    def _write_exit(self, rip: int) -> WriteExit | None:
        """This MMIO write exit of the instruction at `rip` as KVM reports it (instruction_length.py)."""
        uc, mode = self._uc, self._mode
        assert uc is not None and mode is not None
        code, bits = self._code_at_rip(uc, mode, 0, MAX_INSN_BYTES)
        return write_exit(code, rip, bits)

    def memslots_changed(self) -> None:
        """The VM's memslots changed (from any thread): apply them before the guest's next access."""
        self._request_boundary()
        with self._sync:
            self._sync.notify_all()  # a vCPU sleeping in HLT applies them

    def sync_memslots(self, generation: int) -> None:
        """Return once this vCPU no longer uses memslots older than `generation` (synchronize_srcu).

        A vCPU RUNNING in another thread applies the change at its next instruction boundary
        (memslots_changed armed it), or leaves the engine first; either ends the wait. A vCPU IDLE
        or IN_EXIT applies it before it runs guest code again. Called from inside the engine in
        the vCPU's own thread (an in-kernel device changing slots), it cannot wait.
        """
        with self._sync:
            if self._thread == threading.get_ident():
                return
            while self._state is VcpuState.RUNNING and self._mapped_generation() < generation:
                self._sync.wait()

    def _mapped_generation(self) -> int:
        mmu = self._mmu
        return -1 if mmu is None else mmu.generation

    # --- teardown ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Make the engine leave emu_start for good, then drop it (before the VMM frees guest RAM).

        A greenlet paused in an exit is resumed once, in CLOSING: its callback unmaps what it
        safely can and stops the engine (exit_to_user). A greenlet runs only in the thread that
        started it: one RUNNING in another thread is stopped at its next instruction boundary and
        waited for; one paused there in an exit is unwound by that thread's next run().
        """
        with self._sync:
            if self._state is VcpuState.CLOSED:
                return
            was = self._state
            self._set_state(VcpuState.CLOSING)
        if self._thread in (None, threading.get_ident()):
            self._unwind()
        elif was is VcpuState.RUNNING:
            self._request_boundary()
            with self._sync:
                while self._engine_thread is not None:
                    self._sync.wait()
        with self._engine_lock:
            if self._guest is None:  # else still paused in another thread, whose run() unwinds it
                self._uc = self._boundary = self._mmu = self._emulator = None
            with self._sync:
                self._set_state(VcpuState.CLOSED)

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
