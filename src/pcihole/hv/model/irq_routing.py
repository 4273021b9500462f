"""`IrqRoutingTable`: kvm->irq_routing, which pins of the in-kernel irqchip each GSI drives, and
KVM_SET_GSI_ROUTING's checks (kvm_vm_ioctl, kvm_set_irq_routing and setup_routing_entry in
virt/kvm/irqchip.c, kvm_set_routing_entry in arch/x86/kvm/irq.c; irq_comm.c before 6.17), all EINVAL.

An entry is either a pin of the irqchip (KVM_IRQ_ROUTING_IRQCHIP) or an MSI message
(KVM_IRQ_ROUTING_MSI: kvm_set_msi, which raising the GSI sends to the local APICs as
kvm_set_msi_irq decodes it: `msi_irq`).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field

from pcihole.hv import uapi
from pcihole.hv.irq_routing import describe, irqchip_route
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.lapic_irq import APIC_DM_FIXED, APIC_DM_LOWEST, LapicIrq

# include/linux/kvm_host.h: KVM_MAX_IRQ_ROUTES (4096 on x86, and what KVM_CHECK_EXTENSION(
# KVM_CAP_IRQ_ROUTING) answers: measured 4096 on this host's 6.18)
KVM_MAX_IRQ_ROUTES = 4096
# arch/x86/kvm/ioapic.h, irq.h
KVM_IOAPIC_NUM_PINS = 24
PIC_NUM_PINS = 16
# include/uapi/linux/kvm.h: the one flag of an MSI route
KVM_MSI_VALID_DEVID = 1 << 0

IOCTL = "KVM_SET_GSI_ROUTING"


# arch/x86/include/asm/msi.h (struct x86_msi_addr_lo, x86_msi_data)
MSI_ADDR_DEST_MODE_LOGICAL = 1 << 2
MSI_ADDR_REDIRECT_HINT = 1 << 3
MSI_ADDR_DESTID_SHIFT = 12  # destid_0_7: bits 19:12
MSI_DATA_DELIVERY_MODE_SHIFT = 8  # bits 10:8
MSI_DATA_LEVEL = 1 << 15  # is_level (trigger mode)


@dataclass(frozen=True)
class MsiRoute:
    """struct kvm_kernel_irq_routing_entry's msi: the message a GSI routed to MSI sends."""

    address_lo: int
    address_hi: int
    data: int


def msi_irq(msi: MsiRoute) -> LapicIrq:
    """kvm_set_msi_irq without x2apic_format (KVM_CAP_X2APIC_API off, as the model has it): the
    destination is address bits 19:12 only (x86_msi_msg_get_destid(msg, false)), vector, delivery
    mode and trigger from the data, level 1, no shorthand. A redirection hint makes a fixed
    message lowest-priority (kvm_lowest_prio_delivery: "irq->msi_redir_hint")."""
    mode = msi.data >> MSI_DATA_DELIVERY_MODE_SHIFT & 0x7
    delivery_mode = mode << 8
    if msi.address_lo & MSI_ADDR_REDIRECT_HINT and delivery_mode == APIC_DM_FIXED:
        delivery_mode = APIC_DM_LOWEST
    return LapicIrq(
        vector=msi.data & 0xFF,
        delivery_mode=delivery_mode,
        logical=bool(msi.address_lo & MSI_ADDR_DEST_MODE_LOGICAL),
        level=True,
        level_triggered=bool(msi.data & MSI_DATA_LEVEL),
        dest_id=msi.address_lo >> MSI_ADDR_DESTID_SHIFT & 0xFF,
    )


@dataclass(frozen=True)
class IrqRoutingTable:
    """struct kvm_irq_routing_table: `map` (GSI -> its routes) and `chip` (chip, pin -> GSI).

    A route is (chip, pin) as kvm_set_routing_entry stores it: the PIC pair's pins are 0-15 (a slave
    pin is pin + 8, what kvm_set_pic_irq takes), the IOAPIC's 0-23.
    """

    map: dict[int, tuple[tuple[int, int], ...]]
    chip: dict[tuple[int, int], int]
    #: GSI -> its MSI message (a GSI routed to MSI has that one route only: setup_routing_entry).
    msi: dict[int, MsiRoute] = field(default_factory=dict)

    def msi_of(self, gsi: int) -> MsiRoute | None:
        return self.msi.get(gsi)

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
    msis: dict[int, MsiRoute] = {}
    for entry in entries:
        what = describe(entry)
        allowed = KVM_MSI_VALID_DEVID if entry.type == uapi.KVM_IRQ_ROUTING_MSI else 0
        if entry.flags & ~allowed:
            raise _refuse(detail, f"{what}: flags {entry.flags:#x}")
        # setup_routing_entry: one route per chip for a GSI, and a non-irqchip route alone
        mine = routes.setdefault(entry.gsi, [])
        if (mine or entry.gsi in msis) and (
            entry.type != uapi.KVM_IRQ_ROUTING_IRQCHIP
            or entry.gsi in msis
            or any(c == entry.u.irqchip.irqchip for c, _ in mine)
        ):
            raise _refuse(detail, f"{what}: the GSI is routed to this chip already")
        # kvm_set_routing_entry (x86)
        if entry.type == uapi.KVM_IRQ_ROUTING_MSI:
            # kvm_msi_route_invalid refuses only address_hi bits under x2apic_format, which the
            # model does not offer (KVM_CAP_X2APIC_API)
            m = entry.u.msi
            msis[entry.gsi] = MsiRoute(m.address_lo, m.address_hi, m.data)
            continue
        if entry.type != uapi.KVM_IRQ_ROUTING_IRQCHIP:
            raise _refuse(detail, f"{what}: unknown type")
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
    return IrqRoutingTable({gsi: tuple(pins) for gsi, pins in routes.items() if pins}, chip_pins, msis)


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
