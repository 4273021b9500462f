"""KVM_SET_GSI_ROUTING, model vs kvm: with the PC routing machine/builder.py installs (QEMU's
kvm_pc_setup_irq_routing), the PIT's GSI 0 reaches IOAPIC pin 2, as the MADT's interrupt source
override (ISA IRQ 0 -> GSI 2) says, and no longer pin 0; and the ioctl refuses the same tables with
the same errno on both backends."""

from __future__ import annotations

import errno

import pytest

from pcihole.hv import uapi
from pcihole.hv.irq_routing import irqchip_route
from pcihole.hv.uapi import KvmCap
from pcihole.machine.irq_routing import pc_irq_routing
from tests.backends import on_both_backends

from .irqchip_guest import counting_handler, run_irqchip_guest
from .system_guest import RESULTS
from .test_differential_ioapic import (
    MASK_PICS,
    lines,
    pit_mode2_until_three_interrupts,
    redirect,
    request,
    spin_until,
)

MASTER, SLAVE, IOAPIC = uapi.KVM_IRQCHIP_PIC_MASTER, uapi.KVM_IRQCHIP_PIC_SLAVE, uapi.KVM_IRQCHIP_IOAPIC


def test_pc_routing_is_qemus_table():
    """kvm_pc_setup_irq_routing(pci_enabled): 7 master routes (no GSI 2), 8 slave, 23 IOAPIC."""
    routes = {(e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) for e in pc_irq_routing()}
    assert all(e.type == uapi.KVM_IRQ_ROUTING_IRQCHIP and e.flags == 0 for e in pc_irq_routing())
    assert len(routes) == len(pc_irq_routing()) == 7 + 8 + 23
    assert (0, IOAPIC, 2) in routes and (0, MASTER, 0) in routes
    assert not any(gsi == 2 for gsi, _, _ in routes)
    assert not any(chip == IOAPIC and pin == 0 for _, chip, pin in routes)
    assert (9, SLAVE, 1) in routes and (9, IOAPIC, 9) in routes and (23, IOAPIC, 23) in routes


@on_both_backends
def test_routing_capability_is_kvm_max_irq_routes(hypervisor):
    vm = hypervisor.create_vm()
    try:
        assert vm.check_extension(KvmCap.KVM_CAP_IRQ_ROUTING) == 4096
    finally:
        vm.close()


@on_both_backends
def test_pit_reaches_ioapic_pin_2_with_the_pc_routing(hypervisor):
    """The PIT in mode 2 at 1 kHz raises GSI 0: with the PC routing the vector of redirection entry
    2 counts, entry 0's never (test_differential_ioapic has the opposite under KVM's default)."""
    body = f"""
    {pit_mode2_until_three_interrupts()}
    out %al, $0x80
"""
    handlers = [counting_handler(0x60, 0), counting_handler(0x62, 2)]
    run = run_irqchip_guest(hypervisor, body, handlers, pit=True, routing=pc_irq_routing())
    assert not run.stuck
    assert run.q(2) >= 3 and run.q(0) == 0


@on_both_backends
def test_irq_line_follows_the_routing(hypervisor):
    """KVM_IRQ_LINE on GSI 0 -> entry 2's vector; on GSI 2 (no route) -> nothing; GSI 9 still pin 9.
    Then a second KVM_SET_GSI_ROUTING (GSI 5 -> IOAPIC pin 0, alone) replaces the table whole:
    GSI 5 -> entry 0's vector, GSI 0 nothing."""
    body = f"""
    {MASK_PICS}
    {redirect(0, 0x60)}
    {redirect(2, 0x62)}
    {redirect(5, 0x65)}
    {redirect(9, 0x69)}
    {request(1)}
    {spin_until(RESULTS + 0x80, 2)}
    {request(2)}
    {spin_until(RESULTS + 0x80, 3)}
    mov $20000, %ecx
2:  pause
    loop 2b
    out %al, $0x80
"""

    def on_request(vm, vcpu, code):
        if code == 2:
            vm.set_gsi_routing([irqchip_route(5, IOAPIC, 0)])
        drive = {1: [0, 2, 9], 2: [0, 2, 9, 5]}[code]
        lines({code: [(gsi, level) for gsi in drive for level in (True, False)]})(vm, vcpu, code)

    handlers = [counting_handler(0x60, 0), counting_handler(0x62, 2), counting_handler(0x65, 5),
                counting_handler(0x69, 9)]  # fmt: skip
    run = run_irqchip_guest(hypervisor, body, handlers, on_request=on_request, routing=pc_irq_routing())
    assert not run.stuck
    # GSIs 2 and 9 were raised in one exit: the LAPIC takes the higher vector first, so only the set
    # of the first two is the routing's doing.
    log = run.log()
    assert sorted(log[:2]) == [0x62, 0x69] and log[2:] == [0x60]
    assert [run.q(0), run.q(2), run.q(5), run.q(9)] == [1, 1, 0, 1]


def msi_route(gsi: int, address_lo: int, data: int) -> uapi.kvm_irq_routing_entry:
    entry = uapi.kvm_irq_routing_entry(gsi=gsi, type=uapi.KVM_IRQ_ROUTING_MSI)
    entry.u.msi.address_lo = address_lo
    entry.u.msi.data = data
    return entry


MSI_BASE = 0xFEE00000  # the MSI address window; bits 19:12 the destination APIC ID


@on_both_backends
def test_msi_routes_reach_the_lapic(hypervisor):
    """KVM_SET_GSI_ROUTING with MSI entries (kvm_set_routing_entry -> kvm_set_msi), each GSI raised
    and lowered by KVM_IRQ_LINE: fixed (0x70) and lowest-priority (0x71) messages to APIC ID 0
    arrive, once each (level 0 sends nothing); one to APIC ID 5 (0x72) and one in logical mode to
    a LAPIC whose LDR is 0 (0x73) match no LAPIC (kvm_irq_delivery_to_apic)."""
    body = f"""
    {MASK_PICS}
    {request(1)}
    {spin_until(RESULTS + 0x80, 2)}
    mov $20000, %ecx
2:  pause
    loop 2b
    out %al, $0x80
"""
    routing = [
        *pc_irq_routing(),
        msi_route(30, MSI_BASE, 0x70),
        msi_route(31, MSI_BASE, 0x100 | 0x71),
        msi_route(32, MSI_BASE | 5 << 12, 0x72),
        msi_route(33, MSI_BASE | 1 << 12 | 1 << 2, 0x73),
    ]
    on_request = lines({1: [(gsi, level) for gsi in (30, 31, 32, 33) for level in (True, False)]})
    handlers = [counting_handler(0x70 + i, i) for i in range(4)]
    run = run_irqchip_guest(hypervisor, body, handlers, on_request=on_request, routing=routing)
    assert not run.stuck
    assert sorted(run.log()) == [0x70, 0x71]
    assert [run.q(i) for i in range(4)] == [1, 1, 0, 0]


def _bad_tables():
    ok = irqchip_route(4, IOAPIC, 4)
    msi = uapi.kvm_irq_routing_entry(gsi=30, type=uapi.KVM_IRQ_ROUTING_MSI, flags=2)
    return {
        "entry flags": [ok, irqchip_route(3, IOAPIC, 3, flags=1)],
        "msi flags beyond VALID_DEVID": [msi],
        "gsi >= KVM_MAX_IRQ_ROUTES": [irqchip_route(4096, IOAPIC, 1)],
        "ioapic pin 24": [irqchip_route(1, IOAPIC, 24)],
        "master pin 8": [irqchip_route(1, MASTER, 8)],
        "slave pin 8": [irqchip_route(9, SLAVE, 8)],
        "irqchip 3": [irqchip_route(1, 3, 0)],
        "same chip twice for a gsi": [irqchip_route(1, IOAPIC, 1), irqchip_route(1, IOAPIC, 3)],
        "msi and irqchip for a gsi": [msi_route(1, MSI_BASE, 0x70), irqchip_route(1, IOAPIC, 1)],
        "two msis for a gsi": [msi_route(1, MSI_BASE, 0x70), msi_route(1, MSI_BASE, 0x71)],
        "unknown type": [uapi.kvm_irq_routing_entry(gsi=1, type=99)],
    }


@on_both_backends
@pytest.mark.parametrize("case", list(_bad_tables()))
def test_refused_tables_give_einval_and_keep_the_old_one(hypervisor, case):
    vm = hypervisor.create_vm()
    try:
        vm.create_irqchip()
        with pytest.raises(OSError) as e:
            vm.set_gsi_routing(_bad_tables()[case])
        assert e.value.errno == errno.EINVAL
    finally:
        vm.close()


@on_both_backends
def test_routing_errors_outside_the_entries(hypervisor):
    """EINVAL without an irqchip (kvm_arch_can_set_irq_routing) and for the routing's flags; an
    empty table, a GSI on the master and the slave at once, two GSIs on one pin, and a GSI above
    23 are all taken."""
    vm = hypervisor.create_vm()
    try:
        with pytest.raises(OSError) as e:
            vm.set_gsi_routing(pc_irq_routing())
        assert e.value.errno == errno.EINVAL
        vm.create_irqchip()
        with pytest.raises(OSError) as e:
            vm.set_gsi_routing(pc_irq_routing(), flags=1)
        assert e.value.errno == errno.EINVAL
        vm.set_gsi_routing([])
        vm.set_gsi_routing(
            [irqchip_route(1, MASTER, 1), irqchip_route(1, SLAVE, 1), irqchip_route(1, IOAPIC, 1),
             irqchip_route(7, IOAPIC, 1), irqchip_route(4095, IOAPIC, 23)]
        )  # fmt: skip
        vm.set_gsi_routing(pc_irq_routing())
    finally:
        vm.close()
