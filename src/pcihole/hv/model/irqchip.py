"""`Irqchip`: what KVM_CREATE_IRQCHIP creates, wired as KVM wires it (arch/x86/kvm/irq_comm.c, irq.c).

- the 8259 pair (i8259.py) and the IOAPIC (ioapic.py), and a local APIC (lapic.py) in every vCPU
  created afterwards (kvm_arch_vcpu_create -> kvm_create_lapic);
- the GSI routing (irq_routing.py): KVM's default (kvm_setup_default_irq_routing: GSIs 0-15 go to
  PIC pin gsi and IOAPIC pin gsi, 16-23 to the IOAPIC only, so GSI 0 is IOAPIC pin 0) until
  KVM_SET_GSI_ROUTING replaces it (QEMU's kvm_pc_setup_irq_routing sends GSI 0 to IOAPIC pin 2);
- kvm_set_irq: a line's level is the OR of its sources (__kvm_irq_line_state; userspace's
  KVM_IRQ_LINE is source 0, the PIT has its own), handed to each pin the GSI is routed to;
- kvm_irq_delivery_to_apic: an interrupt message (IOAPIC redirection entry, ICR) to every LAPIC
  whose destination matches (kvm_apic_match_dest);
- ack and mask notifiers (kvm_notify_acked_irq, kvm_fire_mask_notifiers), which the PIT listens to.

One lock covers all of them (KVM has one per device; one is simpler and enough for a model). A
vCPU must be woken (kvm_vcpu_kick) only after it is released: the vCPU thread holds its own lock
while it asks the LAPIC for an interrupt, so `later()` queues the wake-ups and `locked()` runs them
once the outermost holder lets go.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pcihole.hv import uapi
from pcihole.hv.model.i8259 import PicPair
from pcihole.hv.model.ioapic import Ioapic
from pcihole.hv.model.irq_routing import IrqRoutingTable, default_routing, msi_irq
from pcihole.hv.model.lapic_irq import APIC_DM_LOWEST, LapicIrq

if TYPE_CHECKING:
    from pcihole.hv.model.i8254 import Pit
    from pcihole.hv.model.lapic import LocalApic

# include/linux/kvm_host.h
KVM_USERSPACE_IRQ_SOURCE_ID = 0
KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID = 1
# arch/x86/kvm/ioapic.h / irq.h
IOAPIC_NUM_PINS = 24
PIC_NUM_PINS = 16
# include/uapi/linux/kvm.h: the irqchip ids of a routing entry
KVM_IRQCHIP_PIC_MASTER = uapi.KVM_IRQCHIP_PIC_MASTER
KVM_IRQCHIP_PIC_SLAVE = uapi.KVM_IRQCHIP_PIC_SLAVE
KVM_IRQCHIP_IOAPIC = uapi.KVM_IRQCHIP_IOAPIC


class Irqchip:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._depth = 0
        self._later: list[Callable[[], None]] = []
        self.lapics: list[LocalApic] = []
        self.pic = PicPair(self)
        self.ioapic = Ioapic(self)
        self.pit: Pit | None = None
        self._next_source_id = KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID + 1
        # kvm->irq_routing: replaced whole (set_routing), read under the lock
        self.routing: IrqRoutingTable = default_routing()
        # kvm_register_irq_ack_notifier / kvm_register_irq_mask_notifier, by GSI
        self._ack_notifiers: dict[int, list[Callable[[], None]]] = {}
        self._mask_notifiers: dict[int, list[Callable[[bool], None]]] = {}
        self.closed = False

    # --- the lock, and what runs after it ------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the irqchip's lock; the outermost holder runs the queued wake-ups once released."""
        with self.lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                run = []
                if self._depth == 0:
                    run, self._later = self._later, []
        for action in run:
            action()

    def later(self, action: Callable[[], None]) -> None:
        """Run `action` (a vCPU kick, an NMI) once the lock is released (the caller holds it)."""
        self._later.append(action)

    def request_irq_source_id(self) -> int:
        """kvm_request_irq_source_id: a new source whose level is OR-ed into the lines it drives."""
        source_id = self._next_source_id
        self._next_source_id += 1
        return source_id

    # --- GSIs --------------------------------------------------------------------------------------

    def set_irq(self, source_id: int, gsi: int, level: bool) -> int:
        """kvm_set_irq: each pin the GSI is routed to gets the level; how many LAPICs took it (-1:
        none, masked or coalesced), as KVM_IRQ_LINE_STATUS reports; a GSI with no route does nothing."""
        with self.locked():
            msi = self.routing.msi_of(gsi)
            if msi is not None:
                # kvm_set_msi: a message per rising level, none for level 0
                return self.deliver_to_apic(None, msi_irq(msi)) if level else -1
            ret = -1
            for chip, pin in self.routing.pins_of(gsi):
                if chip == KVM_IRQCHIP_IOAPIC:
                    r = self.ioapic.set_irq(pin, source_id, level)  # kvm_set_ioapic_irq
                else:
                    r = self.pic.set_irq(pin, source_id, level)  # kvm_set_pic_irq, pins 0-15
                if r < 0:
                    continue
                ret = r + (0 if ret < 0 else ret)
            return ret

    def set_routing(self, routing: IrqRoutingTable) -> None:
        """kvm_set_irq_routing's swap (rcu_assign_pointer(kvm->irq_routing, new)), under the lock."""
        with self.locked():
            self.routing = routing

    def register_ack_notifier(self, gsi: int, notifier: Callable[[], None]) -> None:
        self._ack_notifiers.setdefault(gsi, []).append(notifier)

    def register_mask_notifier(self, gsi: int, notifier: Callable[[bool], None]) -> None:
        self._mask_notifiers.setdefault(gsi, []).append(notifier)

    def notify_acked_irq(self, chip: int, pin: int) -> None:
        """kvm_notify_acked_irq: the guest acknowledged `pin` of `chip` (PIC EOI, IOAPIC EOI; a slave
        PIC's pins count from 0 here); the GSI routed there (kvm_irq_map_chip_pin), if any, is told."""
        gsi = self.routing.gsi_of(chip, pin)
        for notifier in self._ack_notifiers.get(gsi, ()) if gsi >= 0 else ():
            notifier()

    def fire_mask_notifiers(self, chip: int, pin: int, mask: bool) -> None:
        """kvm_fire_mask_notifiers: `pin` of `chip` was masked or unmasked."""
        gsi = self.routing.gsi_of(chip, pin)
        for notifier in self._mask_notifiers.get(gsi, ()) if gsi >= 0 else ():
            notifier(mask)

    # --- interrupt messages to local APICs -----------------------------------------------------------

    def deliver_to_apic(self, source: LocalApic | None, irq: LapicIrq) -> int:
        """kvm_irq_delivery_to_apic (the slow path, which the fast path agrees with): -1 if no LAPIC
        matched, else how many accepted it. Lowest priority goes to the first match (one vCPU)."""
        ret = -1
        lowest: LocalApic | None = None
        for apic in self.lapics:
            if not apic.present() or not apic.match_dest(source, irq.shorthand, irq.dest_id, irq.logical):
                continue
            if irq.delivery_mode != APIC_DM_LOWEST:
                ret = max(ret, 0) + apic.accept_irq(irq)
            elif apic.sw_enabled() and lowest is None:
                lowest = apic
        if lowest is not None:
            ret = max(ret, 0) + lowest.accept_irq(irq)
        return ret

    def pic_output_changed(self, level: bool) -> None:
        """pic_irq_request / pic_unlock: the PIC's INTR went high; wake the vCPUs that take ExtINT."""
        if level:
            for apic in self.lapics:
                if apic.accepts_pic_interrupt():
                    apic.kick()

    def eoi_to_ioapic(self, apic: LocalApic, vector: int, level_triggered: bool) -> None:
        """kvm_ioapic_send_eoi -> kvm_ioapic_update_eoi."""
        self.ioapic.update_eoi(apic, vector, level_triggered)

    def close(self) -> None:
        """Stop every timer (outside the lock: a timer callback may be waiting for it)."""
        self.closed = True
        timers = [apic.timer for apic in self.lapics]
        if self.pit is not None:
            timers.append(self.pit.timer)
        for timer in timers:
            timer.close()
