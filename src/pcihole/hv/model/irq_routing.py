"""`IrqRoutingTable`: kvm->irq_routing, which pins of the in-kernel irqchip each GSI drives, and
KVM_SET_GSI_ROUTING's checks (kvm_vm_ioctl, kvm_set_irq_routing and setup_routing_entry in
virt/kvm/irqchip.c, kvm_set_routing_entry in arch/x86/kvm/irq.c; irq_comm.c before 6.17), all EINVAL.

The model routes to its irqchip only: a KVM_IRQ_ROUTING_MSI entry, which the kernel takes
(kvm_set_msi), is refused with EINVAL (the model has no MSI delivery from a route).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from pcihole.hv import uapi
from pcihole.hv.irq_routing import describe, irqchip_route
from pcihole.hv.model.errors import ModelKvmError

# include/linux/kvm_host.h: KVM_MAX_IRQ_ROUTES (4096 on x86, and what KVM_CHECK_EXTENSION(
# KVM_CAP_IRQ_ROUTING) answers: measured 4096 on this host's 6.18)
KVM_MAX_IRQ_ROUTES = 4096
# arch/x86/kvm/ioapic.h, irq.h
KVM_IOAPIC_NUM_PINS = 24
PIC_NUM_PINS = 16
# include/uapi/linux/kvm.h: the one flag of an MSI route
KVM_MSI_VALID_DEVID = 1 << 0

IOCTL = "KVM_SET_GSI_ROUTING"


@dataclass(frozen=True)
class IrqRoutingTable:
    """struct kvm_irq_routing_table: `map` (GSI -> its routes) and `chip` (chip, pin -> GSI).

    A route is (chip, pin) as kvm_set_routing_entry stores it: the PIC pair's pins are 0-15 (a slave
    pin is pin + 8, what kvm_set_pic_irq takes), the IOAPIC's 0-23.
    """

    map: dict[int, tuple[tuple[int, int], ...]]
    chip: dict[tuple[int, int], int]

    def pins_of(self, gsi: int) -> tuple[tuple[int, int], ...]:
        """kvm_irq_map_gsi: where GSI `gsi` goes (nothing for a GSI with no route)."""
        return self.map.get(gsi, ())

    def gsi_of(self, chip: int, pin: int) -> int:
        """kvm_irq_map_chip_pin: the GSI routed to `pin` of `chip` (a slave PIC's pins count from 0,
        as the 8259 model numbers them), or -1."""
        if chip == uapi.KVM_IRQCHIP_PIC_SLAVE:
            pin += PIC_NUM_PINS // 2
        return self.chip.get((chip, pin), -1)


def _refuse(detail: str, why: str) -> ModelKvmError:
    return ModelKvmError(errno.EINVAL, IOCTL, detail, why)


def build_routing(entries: Sequence[uapi.kvm_irq_routing_entry], flags: int = 0) -> IrqRoutingTable:
    """The table KVM_SET_GSI_ROUTING would install, or EINVAL as the kernel refuses it, checked in
    the kernel's order (the caller checks the irqchip first: kvm_arch_can_set_irq_routing)."""
    detail = f"nr={len(entries)}, flags={flags:#x}"
    # kvm_vm_ioctl(KVM_SET_GSI_ROUTING)
    if len(entries) > KVM_MAX_IRQ_ROUTES:
        raise _refuse(detail, f"more than KVM_MAX_IRQ_ROUTES ({KVM_MAX_IRQ_ROUTES}) entries")
    if flags:
        raise _refuse(detail, "the routing's flags must be 0")
    # kvm_set_irq_routing: every GSI first, then each entry in order
    for entry in entries:
        if entry.gsi >= KVM_MAX_IRQ_ROUTES:
            raise _refuse(detail, f"{describe(entry)}: GSI >= KVM_MAX_IRQ_ROUTES ({KVM_MAX_IRQ_ROUTES})")
    routes: dict[int, list[tuple[int, int]]] = {}
    chip_pins: dict[tuple[int, int], int] = {}
    for entry in entries:
        what = describe(entry)
        allowed = KVM_MSI_VALID_DEVID if entry.type == uapi.KVM_IRQ_ROUTING_MSI else 0
        if entry.flags & ~allowed:
            raise _refuse(detail, f"{what}: flags {entry.flags:#x}")
        # setup_routing_entry: one route per chip for a GSI, and a non-irqchip route alone
        mine = routes.setdefault(entry.gsi, [])
        if mine and (
            entry.type != uapi.KVM_IRQ_ROUTING_IRQCHIP or any(c == entry.u.irqchip.irqchip for c, _ in mine)
        ):
            raise _refuse(detail, f"{what}: the GSI is routed to this chip already")
        # kvm_set_routing_entry (x86)
        if entry.type != uapi.KVM_IRQ_ROUTING_IRQCHIP:
            why = "the model has no MSI routes" if entry.type == uapi.KVM_IRQ_ROUTING_MSI else "unknown type"
            raise _refuse(detail, f"{what}: {why}")
        chip, pin = entry.u.irqchip.irqchip, entry.u.irqchip.pin
        if chip in (uapi.KVM_IRQCHIP_PIC_MASTER, uapi.KVM_IRQCHIP_PIC_SLAVE):
            if pin >= PIC_NUM_PINS // 2:
                raise _refuse(detail, f"{what}: a PIC has pins 0-{PIC_NUM_PINS // 2 - 1}")
            if chip == uapi.KVM_IRQCHIP_PIC_SLAVE:
                pin += PIC_NUM_PINS // 2
        elif chip == uapi.KVM_IRQCHIP_IOAPIC:
            if pin >= KVM_IOAPIC_NUM_PINS:
                raise _refuse(detail, f"{what}: the IOAPIC has pins 0-{KVM_IOAPIC_NUM_PINS - 1}")
        else:
            raise _refuse(detail, f"{what}: no such irqchip")
        chip_pins[(chip, pin)] = entry.gsi  # rt->chip[irqchip][pin] = gsi: the last route wins
        mine.append((chip, pin))
    return IrqRoutingTable({gsi: tuple(pins) for gsi, pins in routes.items()}, chip_pins)


def default_routing() -> IrqRoutingTable:
    """kvm_setup_default_irq_routing (KVM_CREATE_IRQCHIP): GSI 0-15 -> the PIC pair's pin gsi and
    IOAPIC pin gsi (ROUTING_ENTRY2), 16-23 -> IOAPIC pin gsi (ROUTING_ENTRY1)."""
    entries = []
    for gsi in range(KVM_IOAPIC_NUM_PINS):
        if gsi < PIC_NUM_PINS:
            chip = uapi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else uapi.KVM_IRQCHIP_PIC_SLAVE
            entries.append(irqchip_route(gsi, chip, gsi % 8))
        entries.append(irqchip_route(gsi, uapi.KVM_IRQCHIP_IOAPIC, gsi))
    return build_routing(entries)
