"""A PCIe switch's ports: one upstream port on a link, downstream ports on the switch's internal bus.

The identities are QEMU's (hw/pci-bridge/xio3130_upstream.c, xio3130_downstream.c): TI XIO3130
104c:8232 revision 2 upstream, 104c:8233 revision 1 downstream, class 0x060400, PCIe capability with
Device/Port Type Upstream (5) or Downstream (6), AER at 0x100. A downstream port has a hot-plug slot,
as pcie_cap_slot_init() gives it, so it behaves like a root port for hot-plug (pciehp binds to
both). Linux's set_pcie_port_type() reads the port types, and only_one_child() then scans only
device 0 below a downstream port; the upstream port's secondary bus (the internal bus) is scanned
in full. Like QEMU's, they signal with MSI only: Interrupt Pin 0.
"""

from __future__ import annotations

from .pcie_port import PciePort
from .registers import PCI_EXP_TYPE_DOWNSTREAM, PCI_EXP_TYPE_UPSTREAM
from .topology import DownstreamPortSpec, UpstreamPortSpec


class UpstreamPort(PciePort):
    kind = "upstream port"

    def __init__(self, spec: UpstreamPortSpec) -> None:
        super().__init__(
            spec,
            port_type=PCI_EXP_TYPE_UPSTREAM,
            port_number=0,
            physical_slot=None,
            interrupt_pin=0,
        )


class DownstreamPort(PciePort):
    kind = "downstream port"

    def __init__(self, spec: DownstreamPortSpec) -> None:
        super().__init__(
            spec,
            port_type=PCI_EXP_TYPE_DOWNSTREAM,
            # QEMU's xio3130-downstream numbers its port by its device (pcie_port_init_reg: "port").
            port_number=spec.bdf.device,
            physical_slot=spec.slot_number,
            interrupt_pin=0,
        )
