"""One interrupt line of a device: the GSI it drives and the controller behind it.

A device calls `set(level)`; the line forwards only changes to the controller (each forward is a
KVM_IRQ_LINE ioctl on kvm), so a device may recompute its level after every register access, as
QEMU's devices do with qemu_set_irq.
"""

from __future__ import annotations

from pcihole.hv.interface import InterruptLines


class IrqLine:
    def __init__(self, controller: InterruptLines | None, gsi: int) -> None:
        self.controller = controller
        self.gsi = gsi
        self.level = False
        #: 0 -> 1 transitions, for statistics and tests.
        self.raised = 0

    def set(self, level: bool) -> None:
        if level == self.level:
            return
        self.level = level
        if level:
            self.raised += 1
        if self.controller is not None:
            self.controller.set_irq_line(self.gsi, level)
