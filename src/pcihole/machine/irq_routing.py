"""The GSI routing of a PC, as QEMU installs it over KVM's in-kernel irqchip, so that the MADT's
interrupt source override (ISA IRQ 0 -> GSI 2, acpi/madt.py) is true.

KVM's default routing (kvm_setup_default_irq_routing) sends GSI n to IOAPIC pin n, so the PIT
(KVM_CREATE_PIT2, which raises GSI 0) would reach IOAPIC pin 0. On a PC the 8254 is wired to the
IOAPIC's pin 2 (pin 0 carries the 8259's INTR), which is what QEMU's kvm_pc_setup_irq_routing
(hw/i386/kvm/ioapic.c) tells KVM right after KVM_CREATE_IRQCHIP:

    GSI i < 8, i != 2  -> master 8259 pin i      (pin 2 is the cascade)
    GSI 8-15           -> slave 8259 pin i - 8
    GSI 0              -> IOAPIC pin 2
    GSI 1-23, i != 2   -> IOAPIC pin i           (with pci_enabled, as on q35)

so nothing drives GSI 2 and IOAPIC pin 0.
"""

from __future__ import annotations

from pcihole.hv import uapi
from pcihole.hv.irq_routing import irqchip_route

IOAPIC_PINS = 24
PIT_IOAPIC_PIN = 2  # where a PC wires the 8254's OUT0 on the IOAPIC
PIC_CASCADE_PIN = 2  # the master 8259's pin the slave's INTR feeds


def pc_irq_routing() -> list[uapi.kvm_irq_routing_entry]:
    """kvm_pc_setup_irq_routing(pci_enabled=true), in QEMU's order."""
    entries = []
    for gsi in range(8):
        if gsi != PIC_CASCADE_PIN:
            entries.append(irqchip_route(gsi, uapi.KVM_IRQCHIP_PIC_MASTER, gsi))
    for gsi in range(8, 16):
        entries.append(irqchip_route(gsi, uapi.KVM_IRQCHIP_PIC_SLAVE, gsi - 8))
    for gsi in range(IOAPIC_PINS):
        if gsi == 0:
            entries.append(irqchip_route(gsi, uapi.KVM_IRQCHIP_IOAPIC, PIT_IOAPIC_PIN))
        elif gsi != PIT_IOAPIC_PIN:
            entries.append(irqchip_route(gsi, uapi.KVM_IRQCHIP_IOAPIC, gsi))
    return entries
