"""PendingEvents.deliver reports a triple fault whatever it delivered (pure: Unicorn, no /dev/kvm)."""

from __future__ import annotations

import threading

import pytest

from pcihole.hv.model import cpu
from pcihole.hv.model.engine_state import EngineState
from pcihole.hv.model.interrupts import Event
from pcihole.hv.model.pending_events import Due, PendingEvents
from pcihole.hv.uapi import kvm_regs

X86_EFLAGS_IF = 1 << 9


class OneInterrupt:
    """An in-kernel source holding one interrupt (the LAPIC's role)."""

    def __init__(self, vector: int) -> None:
        self.vector: int | None = vector

    def has_interrupt(self) -> bool:
        return self.vector is not None

    def acknowledge(self) -> int:
        vector, self.vector = self.vector, None
        assert vector is not None
        return vector


@pytest.mark.parametrize("triple_faults", [False, True])
def test_a_source_interrupt_s_delivery_reports_a_triple_fault_as_the_others_do(triple_faults):
    sregs = cpu.reset_sregs()
    sregs.cs.base = sregs.cs.selector << 4
    uc = cpu.new_engine(cpu.CpuMode.REAL, kvm_regs(rip=0, rflags=0x2 | X86_EFLAGS_IF), sregs)
    state = EngineState(uc, long_mode=False)
    delivered: list[Event] = []

    def deliver(_uc, event: Event) -> bool:
        delivered.append(event)
        return not triple_faults  # interrupts.py's Delivery: False where it triple-faulted

    events = PendingEvents(set(), threading.Condition(), lambda: None, deliver, lambda: False)
    events.source = OneInterrupt(0x30)
    due = events.due(uc, state)
    assert due is Due.SOURCE
    assert events.deliver(uc, state, due) is not triple_faults
    assert [e.vector for e in delivered] == [0x30]
