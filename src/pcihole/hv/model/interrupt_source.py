"""`InterruptSource`: an in-kernel interrupt controller as the model vCPU sees it.

KVM's vCPU asks its in-kernel LAPIC two things (arch/x86/kvm/irq.c): is an interrupt pending
(kvm_cpu_has_injectable_intr), and which vector to deliver, moving it to in-service
(kvm_cpu_get_interrupt). A device that raises one calls ModelVcpu.interrupt_pending() from any
thread (kvm_vcpu_kick after setting IRR). With a source attached, HLT no longer exits to the VMM:
the vCPU sleeps in run() until the source has an interrupt the guest can take (kvm_vcpu_halt).
The local APIC (lapic.py) implements it; tests also use a one-vector source.
"""

from __future__ import annotations

from typing import Protocol


class InterruptSource(Protocol):
    def has_interrupt(self) -> bool:
        """An interrupt is pending (kvm_cpu_has_injectable_intr). Called from the vCPU thread."""
        ...

    def acknowledge(self) -> int:
        """The vector to deliver now, which becomes in-service (kvm_cpu_get_interrupt)."""
        ...
