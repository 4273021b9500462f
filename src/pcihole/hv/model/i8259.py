"""`PicPair`: KVM's in-kernel 8259A master / slave pair (arch/x86/kvm/i8259.c, QEMU's hw/intc/i8259.c).

Ports on KVM_PIO_BUS: 0x20-0x21 (master), 0xa0-0xa1 (slave), 0x4d0-0x4d1 (ELCR, the edge / level
control registers). ICW1 (bit 4 set on the command port) starts initialisation: ICW2 the vector
base, ICW3 the cascade, ICW4 (when ICW1 asked for it) auto-EOI and special fully nested mode, as
Linux's init_8259A writes them; afterwards the data port is the mask (OCW1) and the command port
takes OCW2 (EOI, specific EOI, rotations) and OCW3 (read IRR / ISR, poll). Byte accesses only.

The slave's output is the master's IRQ 2 (pic_update_irq); the master's output goes to the local
APIC's LINT0 and counts only where LVT0 is ExtINT and unmasked (kvm_apic_accept_pic_intr): Linux
masks LVT0 once it uses the IOAPIC, and the 8259s, masked by init_8259A / legacy_pic's
mask_all, deliver nothing. The vector is taken by kvm_pic_read_irq (INTA) when the vCPU injects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcihole.hv.model.io_bus import PortRange

if TYPE_CHECKING:
    from pcihole.hv.model.irqchip import Irqchip

MASTER_PORT = 0x20
SLAVE_PORT = 0xA0
ELCR_PORT = 0x4D0
PIC_PORTS = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1


class Pic:
    """struct kvm_kpic_state: one 8259A."""

    def __init__(self, pair: PicPair, index: int, elcr_mask: int) -> None:
        self.pair = pair
        self.index = index
        self.elcr_mask = elcr_mask
        self.last_irr = self.irr = self.imr = self.isr = 0
        self.priority_add = 0
        self.irq_base = 0
        self.read_reg_select = 0
        self.poll = False
        self.special_mask = 0
        self.init_state = 0
        self.auto_eoi = 0
        self.rotate_on_auto_eoi = 0
        self.special_fully_nested_mode = 0
        self.init4 = 0
        self.elcr = 0

    def set_irq1(self, irq: int, level: bool) -> int:
        """pic_set_irq1: latch an edge (or follow a level) on pin `irq`; -1 if it is masked."""
        mask = 1 << irq
        ret = 1
        if self.elcr & mask:  # level triggered
            if level:
                ret = 0 if self.irr & mask else 1
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:  # edge triggered
            if not self.last_irr & mask:
                ret = 0 if self.irr & mask else 1
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask
        return -1 if self.imr & mask else ret

    def get_priority(self, mask: int) -> int:
        if mask == 0:
            return 8
        priority = 0
        while not mask & (1 << ((priority + self.priority_add) & 7)):
            priority += 1
        return priority

    def get_irq(self) -> int:
        """pic_get_irq: the highest-priority unmasked request above the one in service, or -1."""
        priority = self.get_priority(self.irr & ~self.imr)
        if priority == 8:
            return -1
        mask = self.isr
        if self.special_fully_nested_mode and self.index == 0:
            mask &= ~(1 << 2)
        if priority < self.get_priority(mask):
            return (priority + self.priority_add) & 7
        return -1

    def clear_isr(self, irq: int) -> None:
        """pic_clear_isr, and the ack notifiers (the PIT's reinjection listens)."""
        self.isr &= ~(1 << irq)
        self.pair.irqchip.notify_acked_irq(self.index, irq)

    def intack(self, irq: int) -> None:
        """pic_intack."""
        self.isr |= 1 << irq
        if not self.elcr & (1 << irq):  # a level-sensitive request stays
            self.irr &= ~(1 << irq)
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
            self.clear_isr(irq)

    def reset(self) -> None:
        """kvm_pic_reset (ICW1)."""
        self.last_irr = 0
        self.irr &= self.elcr
        self.imr = 0
        self.priority_add = 0
        self.special_mask = 0
        self.read_reg_select = 0
        if not self.init4:
            self.special_fully_nested_mode = 0
            self.auto_eoi = 0
        self.init_state = 1
        for irq in range(8):
            if self.isr & (1 << irq):
                self.clear_isr(irq)
        self.isr = 0

    def ioport_write(self, addr: int, val: int) -> None:
        """pic_ioport_write."""
        if addr & 1 == 0:
            if val & 0x10:  # ICW1
                self.init4 = val & 1
                self.reset()
            elif val & 0x08:  # OCW3
                if val & 0x04:
                    self.poll = True
                if val & 0x02:
                    self.read_reg_select = val & 1
                if val & 0x40:
                    self.special_mask = (val >> 5) & 1
            else:  # OCW2
                cmd = val >> 5
                if cmd in (0, 4):
                    self.rotate_on_auto_eoi = cmd >> 2
                elif cmd in (1, 5):  # non-specific EOI (and rotate)
                    priority = self.get_priority(self.isr)
                    if priority != 8:
                        irq = (priority + self.priority_add) & 7
                        if cmd == 5:
                            self.priority_add = (irq + 1) & 7
                        self.clear_isr(irq)
                        self.pair.update_irq()
                elif cmd == 3:  # specific EOI
                    self.clear_isr(val & 7)
                    self.pair.update_irq()
                elif cmd == 6:  # set priority
                    self.priority_add = (val + 1) & 7
                    self.pair.update_irq()
                elif cmd == 7:  # rotate on specific EOI
                    irq = val & 7
                    self.priority_add = (irq + 1) & 7
                    self.clear_isr(irq)
                    self.pair.update_irq()
            return
        if self.init_state == 0:  # OCW1: the mask
            diff = self.imr ^ val
            self.imr = val
            for irq in range(8):
                if diff & (1 << irq):
                    self.pair.irqchip.fire_mask_notifiers(self.index, irq, bool(val & (1 << irq)))
            self.pair.update_irq()
        elif self.init_state == 1:  # ICW2
            self.irq_base = val & 0xF8
            self.init_state = 2
        elif self.init_state == 2:  # ICW3
            self.init_state = 3 if self.init4 else 0
        elif self.init_state == 3:  # ICW4
            self.special_fully_nested_mode = (val >> 4) & 1
            self.auto_eoi = (val >> 1) & 1
            self.init_state = 0

    def poll_read(self, addr1: int) -> int:
        """pic_poll_read: OCW3 poll, an INTA by reading the command port."""
        ret = self.get_irq()
        if ret >= 0:
            if addr1 >> 7:
                master = self.pair.pics[0]
                master.isr &= ~(1 << 2)
                master.irr &= ~(1 << 2)
            self.irr &= ~(1 << ret)
            self.clear_isr(ret)
            if addr1 >> 7 or ret != 2:
                self.pair.update_irq()
            return ret | 0x80
        self.pair.update_irq()
        return 0x07

    def ioport_read(self, addr: int) -> int:
        if self.poll:
            ret = self.poll_read(addr)
            self.poll = False
            return ret
        if addr & 1 == 0:
            return self.isr if self.read_reg_select else self.irr
        return self.imr


class PicPair:
    """struct kvm_pic: master and slave, their output to LINT0, the per-pin source levels."""

    def __init__(self, irqchip: Irqchip) -> None:
        self.irqchip = irqchip
        self.pics = (Pic(self, 0, 0xF8), Pic(self, 1, 0xDE))
        self.output = False
        self._irq_states = [0] * 16
        #: The three PIO devices kvm_pic_init registers: dev_master, dev_slave, dev_eclr.
        self.devices = [
            PortRange(base, PIC_PORTS, self.read, self.write) for base in (MASTER_PORT, SLAVE_PORT, ELCR_PORT)
        ]

    def update_irq(self) -> None:
        """pic_update_irq: the slave's request pulses master IRQ 2; the master's request is INTR."""
        if self.pics[1].get_irq() >= 0:
            self.pics[0].set_irq1(2, True)
            self.pics[0].set_irq1(2, False)
        level = self.pics[0].get_irq() >= 0
        changed = level != self.output
        self.output = level
        if changed:
            self.irqchip.pic_output_changed(level)

    def set_irq(self, irq: int, source_id: int, level: bool) -> int:
        """kvm_pic_set_irq."""
        with self.irqchip.locked():
            bit = 1 << source_id
            state = self._irq_states[irq]
            state = state | bit if level else state & ~bit
            self._irq_states[irq] = state
            ret = self.pics[irq >> 3].set_irq1(irq & 7, state != 0)
            self.update_irq()
            return ret

    def read_irq(self) -> int:
        """kvm_pic_read_irq: INTA, the vector of the highest request (7 / 15 if spurious)."""
        with self.irqchip.locked():
            master, slave = self.pics
            irq = master.get_irq()
            if irq >= 0:
                master.intack(irq)
                if irq == 2:
                    irq2 = slave.get_irq()
                    if irq2 >= 0:
                        slave.intack(irq2)
                    else:
                        irq2 = 7  # spurious IRQ on the slave
                    intno = slave.irq_base + irq2
                else:
                    intno = master.irq_base + irq
            else:
                intno = master.irq_base + 7  # spurious IRQ on the master
            self.update_irq()
            return intno

    def read(self, addr: int, length: int) -> bytes:
        """picdev_read: one byte (a wider read reads zeros)."""
        if length != 1:
            return bytes(length)
        with self.irqchip.locked():
            if addr in (ELCR_PORT, ELCR_PORT + 1):
                return bytes([self.pics[addr & 1].elcr])
            return bytes([self.pics[addr >> 7].ioport_read(addr) & 0xFF])

    def write(self, addr: int, data: bytes) -> bool:
        """picdev_write: one byte (a wider write is dropped)."""
        if len(data) != 1:
            return True
        with self.irqchip.locked():
            if addr in (ELCR_PORT, ELCR_PORT + 1):
                pic = self.pics[addr & 1]
                pic.elcr = data[0] & pic.elcr_mask
            else:
                self.pics[addr >> 7].ioport_write(addr, data[0])
            return True
