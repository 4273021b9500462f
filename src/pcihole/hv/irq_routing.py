"""Entries of KVM_SET_GSI_ROUTING (Vm.set_gsi_routing), built from what they mean.

A route sends a GSI (what KVM_IRQ_LINE and the in-kernel PIT drive) to a pin of one of the in-kernel
irqchips. The table a VMM installs replaces the whole routing, KVM's default included
(kvm_set_irq_routing); several routes may share a GSI, one per chip.
"""

from __future__ import annotations

from pcihole.hv import uapi


def irqchip_route(gsi: int, irqchip: int, pin: int, flags: int = 0) -> uapi.kvm_irq_routing_entry:
    """A KVM_IRQ_ROUTING_IRQCHIP entry: GSI `gsi` -> pin `pin` of `irqchip` (KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE: pins 0-7; KVM_IRQCHIP_IOAPIC: pins 0-23). `flags` must be 0 for the
    kernel to take it; it is a parameter so that tests can see it refused."""
    entry = uapi.kvm_irq_routing_entry(gsi=gsi, type=uapi.KVM_IRQ_ROUTING_IRQCHIP, flags=flags)
    entry.u.irqchip.irqchip = irqchip
    entry.u.irqchip.pin = pin
    return entry


def describe(entry: uapi.kvm_irq_routing_entry) -> str:
    """`gsi 0 -> irqchip 2 pin 2`, for error messages."""
    if entry.type == uapi.KVM_IRQ_ROUTING_IRQCHIP:
        return f"gsi {entry.gsi} -> irqchip {entry.u.irqchip.irqchip} pin {entry.u.irqchip.pin}"
    return f"gsi {entry.gsi} -> type {entry.type}"
