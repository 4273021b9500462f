"""`Irqchip`: what KVM_CREATE_IRQCHIP creates, wired as KVM wires it (arch/x86/kvm/irq_comm.c, irq.c).

- the 8259 pair (i8259.py) and the IOAPIC (ioapic.py), and a local APIC (lapic.py) in every vCPU
  created afterwards (kvm_arch_vcpu_create -> kvm_create_lapic);
- the default GSI routing (kvm_setup_default_irq_routing): GSIs 0-15 go to PIC pin gsi and IOAPIC
  pin gsi, 16-23 to the IOAPIC only. GSI 0 is IOAPIC pin 0: KVM does not remap it to pin 2 (QEMU
  does, with KVM_SET_GSI_ROUTING in kvm_pc_setup_irq_routing); the model has no SET_GSI_ROUTING;
- kvm_set_irq: a line's level is the OR of its sources (__kvm_irq_line_state; userspace's
  KVM_IRQ_LINE is source 0, the PIT has its own), handed to each routed pin;
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

from pcihole.hv.model.i8259 import PicPair
from pcihole.hv.model.ioapic import Ioapic
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
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


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
        """kvm_set_irq over the default routing: how many LAPICs took it (-1: none, masked or
        coalesced), as KVM_IRQ_LINE_STATUS reports; a GSI with no route does nothing."""
        with self.locked():
            ret = -1
            if 0 <= gsi < PIC_NUM_PINS:
                ret = self.pic.set_irq(gsi, source_id, level)  # kvm_set_pic_irq
            if 0 <= gsi < IOAPIC_NUM_PINS:
                r = self.ioapic.set_irq(gsi, source_id, level)  # kvm_set_ioapic_irq
                ret = r + (0 if ret < 0 else ret)
            return ret

    def register_ack_notifier(self, gsi: int, notifier: Callable[[], None]) -> None:
        self._ack_notifiers.setdefault(gsi, []).append(notifier)

    def register_mask_notifier(self, gsi: int, notifier: Callable[[bool], None]) -> None:
        self._mask_notifiers.setdefault(gsi, []).append(notifier)

    def notify_acked_irq(self, chip: int, pin: int) -> None:
        """kvm_notify_acked_irq: the guest acknowledged `pin` of `chip` (PIC EOI, IOAPIC EOI). With the
        default routing GSI = pin on the IOAPIC and the master PIC, pin + 8 on the slave."""
        gsi = pin + 8 if chip == KVM_IRQCHIP_PIC_SLAVE else pin
        for notifier in self._ack_notifiers.get(gsi, ()):
            notifier()

    def fire_mask_notifiers(self, chip: int, pin: int, mask: bool) -> None:
        gsi = pin + 8 if chip == KVM_IRQCHIP_PIC_SLAVE else pin
        for notifier in self._mask_notifiers.get(gsi, ()):
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
