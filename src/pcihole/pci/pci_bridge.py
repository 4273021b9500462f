"""A conventional PCI-PCI bridge: QEMU's pci-bridge (hw/pci-bridge/pci_bridge_dev.c), 1b36:0001.

It is a conventional PCI device: no PCIe capability, so Linux treats its secondary bus as
conventional PCI and scans all 32 slots there (only_one_child() is false: the bridge is not a PCIe
Root or Downstream Port). QEMU's pci_bridge_dev_realize() adds, without SHPC (shpc=off, which this
model is: hot-plug below it is not offered), the Slot Identification capability (ID 0x04,
slotid_cap_init(dev, 0, chassis_nr, 0)): zero expansion slots, First In Chassis set, and the
chassis number, which the guest may rewrite (PCI-to-PCI Bridge Architecture 1.2 §13.2). Without SHPC
QEMU leaves Interrupt Pin at 0.
"""

from __future__ import annotations

from .capabilities import add_capability
from .registers import (
    PCI_CAP_ID_SLOTID,
    PCI_SID_CHASSIS_NR,
    PCI_SID_ESR,
    PCI_SID_ESR_FIC,
    PCI_SID_SIZEOF,
)
from .topology import PciBridgeSpec
from .type1_header import Type1Function


class PciBridge(Type1Function):
    kind = "pci bridge"

    def __init__(self, spec: PciBridgeSpec) -> None:
        super().__init__(
            spec,
            interrupt_pin=0,
        )
        self.slotid_cap = add_capability(self.config, PCI_CAP_ID_SLOTID, PCI_SID_SIZEOF)
        self.config.init_int(self.slotid_cap + PCI_SID_ESR, 1, PCI_SID_ESR_FIC)  # 0 slots, first in chassis
        self.config.init_int(self.slotid_cap + PCI_SID_CHASSIS_NR, 1, spec.chassis_number)
        self.config.init_writable(self.slotid_cap + PCI_SID_CHASSIS_NR, 1, 0xFF)
