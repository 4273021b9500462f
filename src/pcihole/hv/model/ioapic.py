"""`Ioapic`: KVM's in-kernel I/O APIC (arch/x86/kvm/ioapic.c), 24 pins at 0xfec00000 on the MMIO bus.

The guest selects a register with IOREGSEL (offset 0x00, 8 bits) and reads or writes it through
IOWIN (offset 0x10): 0x00 the id, 0x01 the version (0x11, 24 pins: 0x170011), 0x02 the arbitration
id, 0x10 + 2n / 0x11 + 2n the low / high half of redirection entry n (ioapic_read_indirect /
ioapic_write_indirect). An entry: vector (7:0), delivery mode (10:8), destination mode (11,
logical), delivery status (12, read-only), polarity (13), remote IRR (14, read-only), trigger
mode (15, level), mask (16), destination (63:56).

Delivery (ioapic_set_irq, ioapic_service): an edge-triggered pin fires on a 0 -> 1 change of its
line; a level-triggered one while its line is high and remote IRR is clear, setting remote IRR
once a LAPIC took it; the LAPIC's EOI of that vector clears remote IRR and fires again if the
line is still high (kvm_ioapic_update_eoi_one). A masked pin delivers nothing; unmasking a
level-triggered pin whose line is high delivers (ioapic_write_indirect). Not modelled: the
RTC_GSI coalescing bookkeeping and the EOI-storm delay (IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcihole.hv.model.lapic_irq import LapicIrq

if TYPE_CHECKING:
    from pcihole.hv.model.irqchip import Irqchip
    from pcihole.hv.model.lapic import LocalApic

IOAPIC_DEFAULT_BASE_ADDRESS = 0xFEC00000
IOAPIC_MEM_LENGTH = 0x100
IOAPIC_NUM_PINS = 24
IOAPIC_VERSION_ID = 0x11
IOAPIC_REG_SELECT = 0x00
IOAPIC_REG_WINDOW = 0x10
IOAPIC_REG_APIC_ID = 0x00
IOAPIC_REG_VERSION = 0x01
IOAPIC_REG_ARB_ID = 0x02
KVM_IRQCHIP_IOAPIC = 2

# redirection entry fields (union kvm_ioapic_redirect_entry)
VECTOR_MASK = 0xFF
DELIVERY_MODE_SHIFT = 8
DEST_MODE_LOGICAL = 1 << 11
DELIVERY_STATUS = 1 << 12
REMOTE_IRR = 1 << 14
TRIGGER_LEVEL = 1 << 15
MASKED = 1 << 16
DEST_SHIFT = 56

U64 = (1 << 64) - 1


class Ioapic:
    def __init__(self, irqchip: Irqchip) -> None:
        self.irqchip = irqchip
        self.base_address = IOAPIC_DEFAULT_BASE_ADDRESS
        # kvm_ioapic_reset: every entry masked, the rest zero
        self.redirtbl = [MASKED] * IOAPIC_NUM_PINS
        self.ioregsel = 0
        self.id = 0
        self.irr = 0  # the pins whose line is high
        self.irr_delivered = 0
        self._irq_states = [0] * IOAPIC_NUM_PINS  # per pin, one bit per irq source
        #: How many interrupt messages each pin sent (tests and statistics).
        self.delivered = [0] * IOAPIC_NUM_PINS

    # --- the pins --------------------------------------------------------------------------------

    def set_irq(self, pin: int, source_id: int, level: bool) -> int:
        """kvm_ioapic_set_irq: the line of `pin` is the OR of its sources."""
        with self.irqchip.locked():
            bit = 1 << source_id
            self._irq_states[pin] = self._irq_states[pin] | bit if level else self._irq_states[pin] & ~bit
            return self._set_pin(pin, self._irq_states[pin] != 0)

    def _set_pin(self, pin: int, level: bool) -> int:
        """ioapic_set_irq."""
        mask = 1 << pin
        entry = self.redirtbl[pin]
        edge = not entry & TRIGGER_LEVEL
        if not level:
            self.irr &= ~mask
            return 1
        old_irr = self.irr
        self.irr |= mask
        if edge:
            self.irr_delivered &= ~mask
            if old_irr == self.irr:
                return 0  # the line was high already: no new edge
        return self._service(pin)

    def _service(self, pin: int) -> int:
        """ioapic_service: send the entry's message unless masked or a level interrupt is in service."""
        entry = self.redirtbl[pin]
        level_triggered = bool(entry & TRIGGER_LEVEL)
        if entry & MASKED or (level_triggered and entry & REMOTE_IRR):
            return -1
        irq = LapicIrq(
            vector=entry & VECTOR_MASK,
            delivery_mode=((entry >> DELIVERY_MODE_SHIFT) & 7) << 8,
            logical=bool(entry & DEST_MODE_LOGICAL),
            level=True,
            level_triggered=level_triggered,
            dest_id=entry >> DEST_SHIFT,
        )
        if not level_triggered:
            self.irr_delivered |= 1 << pin
        ret = self.irqchip.deliver_to_apic(None, irq)
        self.delivered[pin] += 1
        if ret > 0 and level_triggered:
            self.redirtbl[pin] |= REMOTE_IRR
        return ret

    def update_eoi(self, apic: LocalApic, vector: int, level_triggered: bool) -> None:
        """kvm_ioapic_update_eoi: every pin with this vector is acknowledged; a level-triggered one
        leaves remote IRR and is serviced again if its line is still high."""
        for pin in range(IOAPIC_NUM_PINS):
            entry = self.redirtbl[pin]
            if entry & VECTOR_MASK != vector:
                continue
            self.irqchip.notify_acked_irq(KVM_IRQCHIP_IOAPIC, pin)
            if not level_triggered:
                continue
            self.redirtbl[pin] &= ~REMOTE_IRR
            if not entry & MASKED and self.irr & (1 << pin):
                self._service(pin)

    # --- registers --------------------------------------------------------------------------------

    def _read_indirect(self) -> int:
        sel = self.ioregsel
        if sel == IOAPIC_REG_VERSION:
            return ((IOAPIC_NUM_PINS - 1) & 0xFF) << 16 | IOAPIC_VERSION_ID
        if sel in (IOAPIC_REG_APIC_ID, IOAPIC_REG_ARB_ID):
            return (self.id & 0xF) << 24
        index = (sel - 0x10) >> 1
        content = self.redirtbl[index] if 0 <= index < IOAPIC_NUM_PINS else U64
        return (content >> 32) & 0xFFFFFFFF if sel & 1 else content & 0xFFFFFFFF

    def _write_indirect(self, val: int) -> None:
        sel = self.ioregsel
        if sel in (IOAPIC_REG_VERSION, IOAPIC_REG_ARB_ID):
            return  # read-only
        if sel == IOAPIC_REG_APIC_ID:
            self.id = (val >> 24) & 0xF
            return
        index = (sel - 0x10) >> 1
        if not 0 <= index < IOAPIC_NUM_PINS:
            return
        old = self.redirtbl[index]
        new = old & 4294967295 | val << 32 if sel & 1 else old & ~4294967295 & U64 | val
        # "Preserve read-only fields"; and "Some OSes (Linux, Xen) assume that Remote IRR bit will be
        # cleared by IOAPIC hardware when the entry is configured as edge-triggered."
        new = (new & ~(REMOTE_IRR | DELIVERY_STATUS)) | (old & (REMOTE_IRR | DELIVERY_STATUS))
        if not new & TRIGGER_LEVEL:
            new &= ~REMOTE_IRR
        self.redirtbl[index] = new
        if (old ^ new) & MASKED:
            self.irqchip.fire_mask_notifiers(KVM_IRQCHIP_IOAPIC, index, bool(new & MASKED))
        if new & TRIGGER_LEVEL and self.irr & (1 << index) and not new & (MASKED | REMOTE_IRR):
            self._service(index)

    # --- the MMIO bus device (ioapic_mmio_read / ioapic_mmio_write) --------------------------------

    def _in_range(self, addr: int) -> bool:
        return self.base_address <= addr < self.base_address + IOAPIC_MEM_LENGTH

    def read(self, addr: int, length: int) -> bytes | None:
        if not self._in_range(addr):
            return None
        with self.irqchip.locked():
            offset = addr & 0xFF
            if offset == IOAPIC_REG_SELECT:
                result = self.ioregsel
            elif offset == IOAPIC_REG_WINDOW:
                result = self._read_indirect()
            else:
                result = 0
            if length not in (1, 2, 4, 8):
                return bytes(length)
            return result.to_bytes(8, "little")[:length]

    def write(self, addr: int, data: bytes) -> bool:
        if not self._in_range(addr):
            return False
        with self.irqchip.locked():
            if len(data) not in (4, 8):
                return True  # "ioapic: Unsupported size": dropped
            val = int.from_bytes(data[:4], "little")
            offset = addr & 0xFF
            if offset == IOAPIC_REG_SELECT:
                self.ioregsel = val & 0xFF
            elif offset == IOAPIC_REG_WINDOW:
                self._write_indirect(val)
            return True
