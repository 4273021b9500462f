"""`PendingEvents`: the interrupts a model vCPU has to deliver, and its sleep in HLT until one comes.

The model's counterpart of what arch/x86/kvm/x86.c keeps for a vCPU between entries and checks at
each one (kvm_check_and_inject_events, inject_pending_event) and of kvm_vcpu_halt:
- KVM_INTERRUPT's vector (kvm_queue_interrupt), delivered at the next entry whatever RFLAGS.IF says;
- KVM_NMI (nmi_queued), delivered where NMIs are not blocked, blocking them until the next IRET;
  queued in the same exit as KVM_INTERRUPT, after that vector's delivery (below);
- kvm_run.request_interrupt_window: an IrqWindowOpen exit once the guest can take an interrupt;
- the in-kernel interrupt source (interrupt_source.py: the LAPIC), whose interrupt waits for IF;
- with a source, HLT as a sleep (mp_state HALTED) until something above can be delivered.

It is its own file because it is one question asked in three places of the run loop (vcpu.py):
between runs, at an instruction boundary (the boundary hook's callback, and its cheap IF poll), and
while asleep in HLT. Each answer must be the same, in the same order: KVM_INTERRUPT's vector first,
then an NMI, then the window exit, then the source; `due` is that order, written once. The vector
comes first because KVM_INTERRUPT (kvm_vcpu_ioctl_interrupt -> kvm_queue_interrupt) marks it
`interrupt.injected`, an event already under way that kvm_check_and_inject_events re-injects
before it looks at new ones (nmi_pending); it then asks for the NMI window (enable_nmi_window),
whose exit comes right after the vector's delivery, so the NMI is taken at the first instruction
of the interrupt's handler, before it runs (measured on this host's KVM, PVM: the vector first as
well, the NMI at a later entry: tests/model/test_differential_interrupts.py). What belongs to the run loop stays
there (kicks, memslot changes, a new engine, closing): this file is handed what it needs of it,
and the engine (`uc`) and its state (`EngineState`, None where out of reach) with each call, since
an engine is replaced when the guest changes mode.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import Enum

from unicorn import Uc

from pcihole.hv import exits
from pcihole.hv.model.engine_state import HF2_NMI_MASK, EngineState
from pcihole.hv.model.interrupt_source import InterruptSource
from pcihole.hv.model.interrupts import NMI, Event, EventKind, interrupt_window_open
from pcihole.hv.model.mmu import Mmu
from pcihole.hv.model.vcpu_state import Request


class Due(Enum):
    """What PendingEvents.due found deliverable first."""

    NMI = "KVM_NMI"
    INTERRUPT = "KVM_INTERRUPT"
    WINDOW = "IrqWindowOpen"
    SOURCE = "the in-kernel source"


class PendingEvents:
    """One vCPU's pending interrupts and its HLT sleep (KVM's mp_state HALTED)."""

    def __init__(
        self,
        requests: set[Request],
        sync: threading.Condition,
        request_boundary: Callable[[], None],
        deliver: Callable[[Uc, Event], bool],
        leaving: Callable[[], bool],
    ) -> None:
        # The vCPU's requests (the same set: a kick ends the sleep), the condition its state
        # changes and wake-ups are notified on, how to stop it at the next instruction boundary,
        # how to deliver through the guest's IDT (False: it triple-faulted, the vCPU stopped with
        # Shutdown), and whether it is closing.
        self._requests = requests
        self._sync = sync
        self._request_boundary = request_boundary
        self._deliver = deliver
        self._leaving = leaving
        #: The external interrupt KVM_INTERRUPT queued, delivered at the next entry (None: none).
        self.injection: int | None = None
        #: kvm_run.request_interrupt_window.
        self.window_requested = False
        #: KVM_NMI (nmi_queued).
        self.nmi_pending = False
        #: The in-kernel interrupt controller (the local APIC); with one, HLT sleeps in run() and
        #: `halted` says the vCPU is in that state (KVM's mp_state HALTED), also across a kick.
        self.source: InterruptSource | None = None
        self.halted = False
        #: The source has an interrupt that waited for IF at the last boundary (at_boundary).
        self.source_waits = False

    def queue_interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: `vector` at the next entry (a second call before it replaces the first)."""
        self.injection = vector
        self._request_boundary()

    def queue_nmi(self) -> None:
        """KVM_NMI: an NMI at the next entry or boundary where NMIs are not blocked; wakes HLT."""
        self.nmi_pending = True
        self.wake()

    def request_window(self, on: bool) -> None:
        """kvm_run.request_interrupt_window."""
        self.window_requested = on
        if on:
            self._request_boundary()

    def wake(self) -> None:
        """Something to deliver (any thread): look at the next boundary, or wake from HLT."""
        self._request_boundary()
        with self._sync:
            self._sync.notify_all()

    def wanted(self) -> bool:
        """Anything for the next instruction boundary to look at."""
        source = self.source
        return (
            self.nmi_pending
            or self.injection is not None
            or self.window_requested
            or (source is not None and source.has_interrupt())
        )

    def queued(self) -> bool:
        """KVM_INTERRUPT, KVM_NMI or the window request: what the VMM asks for at the next entry."""
        return self.injection is not None or self.nmi_pending or self.window_requested

    def only_source_waits(self) -> bool:
        """The source's interrupt waits for IF, and nothing else of this file is asked."""
        return (
            self.source_waits
            and not self.nmi_pending
            and self.injection is None
            and not self.window_requested
        )

    def due(
        self, uc: Uc, state: EngineState | None, *, window: bool = True, source: bool = True
    ) -> Due | None:
        """What is delivered next, if anything can be now: the one order of the three places that
        ask (module docstring), as kvm_check_and_inject_events goes through them, each in turn where
        the one before cannot be delivered (an NMI blocked until IRET does not hold back the rest):
        KVM_INTERRUPT's vector (whatever IF says: re-injected first), an NMI where NMIs are not
        blocked, the interrupt-window exit, the source's interrupt where the guest can take one. `window` /
        `source` False leave those out (HLT wakes for no window; between runs the source's
        interrupt waits for the first block start)."""
        if self.injection is not None:
            return Due.INTERRUPT
        if self.nmi_pending and self.nmi_allowed(state):
            return Due.NMI
        if window and self.window_open(uc, state):
            return Due.WINDOW
        src = self.source
        if source and src is not None and state is not None and src.has_interrupt():
            return Due.SOURCE if interrupt_window_open(uc, state) else None
        return None

    def deliver(self, uc: Uc, state: EngineState | None, due: Due) -> bool:
        """Deliver what `due` said (not the window exit, which is the caller's); False if the
        delivery triple-faulted (the vCPU stopped with Shutdown)."""
        if due is Due.NMI:
            return self.deliver_nmi(uc, state)
        if due is Due.INTERRUPT:
            return self.inject(uc)
        # Due.SOURCE: due() saw the window open, and nothing but this thread can close it.
        return self.deliver_from_source(uc, state)

    def at_boundary(self, uc: Uc, state: EngineState | None) -> bool:
        """At an instruction boundary, once the run loop's own requests are answered: deliver what
        is due (one event, as one VM entry injects one); True if an IrqWindowOpen exit is due (the
        caller stops the engine with it)."""
        due = self.due(uc, state)
        if due is Due.WINDOW:
            return True
        if due is not None and not self.deliver(uc, state, due):
            return False
        source = self.source
        # While an interrupt waits for IF (Linux runs long stretches with interrupts off) the next
        # block starts poll RFLAGS.IF cheaply (only_source_waits; KVM asks the CPU for an
        # interrupt-window exit instead, Unicorn has no such event).
        self.source_waits = due is not Due.SOURCE and source is not None and source.has_interrupt()
        if self.wanted():
            self._request_boundary()  # something left (blocked, or behind this one): look again
        return False

    def deliver_from_source(self, uc: Uc, state: EngineState | None) -> bool:
        """Deliver the source's interrupt if the guest can take it now; True if it was delivered
        (or has gone meanwhile), False if the window is closed or the delivery triple-faulted."""
        source = self.source
        if source is None or state is None or not interrupt_window_open(uc, state):
            return False
        if not source.has_interrupt():  # taken meanwhile, or masked by a TPR raised since
            return True
        return self._deliver(uc, Event(source.acknowledge(), EventKind.EXTERNAL))

    def halt(
        self, uc: Uc, state: EngineState | None, mmu: Mmu | None, in_engine: bool = False
    ) -> exits.VcpuExit | None:
        """HLT with an in-kernel source (kvm_vcpu_halt): sleep until it has an interrupt the guest
        can take (then deliver it and go on: None), a KVM_INTERRUPT, a kick (Interrupted; the vCPU
        stays halted) or close (None). `in_engine` (from the HLT intercept's callback): a memslot
        change also returns None, the vCPU still halted, for the caller to leave the engine."""
        source = self.source
        assert source is not None
        while True:
            if mmu is not None and mmu.stale():
                if in_engine:
                    return None
                # A memslot change waits for this vCPU (sync_memslots): apply it while asleep.
                mmu.sync()
            with self._sync:
                if self._leaving():
                    return None
                if Request.KICK in self._requests:
                    self._requests.discard(Request.KICK)
                    return exits.Interrupted()
                due = self.due(uc, state, window=False)
                if due is not None:
                    break
                if mmu is None or not mmu.stale():
                    self._sync.wait()
        self.halted = False
        self.deliver(uc, state, due)
        return None

    def nmi_allowed(self, state: EngineState | None) -> bool:
        if state is None:
            return True  # no delivery: the vCPU's deliver reports the Shutdown
        state.load()
        return not state.hflags2 & HF2_NMI_MASK

    def deliver_nmi(self, uc: Uc, state: EngineState | None) -> bool:
        """Deliver the pending NMI and block NMIs until the next IRET; False on a triple fault."""
        self.nmi_pending = False
        if not self._deliver(uc, Event(NMI, EventKind.EXTERNAL)):
            return False
        assert state is not None
        state.load()
        state.hflags2 |= HF2_NMI_MASK
        state.store()
        return True

    def inject(self, uc: Uc) -> bool:
        """Deliver the interrupt KVM_INTERRUPT queued; False if that triple-faulted (Shutdown)."""
        vector, self.injection = self.injection, None
        assert vector is not None
        return self._deliver(uc, Event(vector, EventKind.EXTERNAL))

    def window_open(self, uc: Uc, state: EngineState | None) -> bool:
        """An IrqWindowOpen exit is due: requested, and the guest can take an interrupt now."""
        return self.window_requested and state is not None and interrupt_window_open(uc, state)
