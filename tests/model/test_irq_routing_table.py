"""Pure: the model's routing table (hv/model/irq_routing.py) maps GSIs to pins and pins back to
GSIs as kvm_irq_map_gsi / kvm_irq_map_chip_pin do."""

from __future__ import annotations

from pcihole.hv import uapi
from pcihole.hv.irq_routing import irqchip_route
from pcihole.hv.model.irq_routing import build_routing, default_routing
from pcihole.machine.irq_routing import pc_irq_routing

MASTER, SLAVE, IOAPIC = uapi.KVM_IRQCHIP_PIC_MASTER, uapi.KVM_IRQCHIP_PIC_SLAVE, uapi.KVM_IRQCHIP_IOAPIC


def test_default_routing_is_kvm_setup_default_irq_routing():
    table = default_routing()
    assert set(table.pins_of(0)) == {(MASTER, 0), (IOAPIC, 0)}
    assert set(table.pins_of(9)) == {(SLAVE, 9), (IOAPIC, 9)}  # the PIC pair's pin 9: slave pin 1
    assert table.pins_of(20) == ((IOAPIC, 20),)
    assert table.pins_of(24) == ()
    assert table.gsi_of(SLAVE, 1) == 9 and table.gsi_of(IOAPIC, 2) == 2 and table.gsi_of(MASTER, 2) == 2


def test_pc_routing_maps_ioapic_pin_2_back_to_gsi_0():
    """What the PIT's ack and mask notifiers (GSI 0) need when the guest EOIs or masks pin 2."""
    table = build_routing(pc_irq_routing())
    assert set(table.pins_of(0)) == {(MASTER, 0), (IOAPIC, 2)}
    assert table.pins_of(2) == ()
    assert table.gsi_of(IOAPIC, 2) == 0 and table.gsi_of(IOAPIC, 0) == -1 and table.gsi_of(MASTER, 2) == -1


def test_two_gsis_on_one_pin_the_last_wins_the_reverse_map():
    """setup_routing_entry: rt->chip[irqchip][pin] = gsi, overwritten by a later route."""
    table = build_routing([irqchip_route(5, IOAPIC, 3), irqchip_route(7, IOAPIC, 3)])
    assert table.pins_of(5) == table.pins_of(7) == ((IOAPIC, 3),)
    assert table.gsi_of(IOAPIC, 3) == 7
