"""Root ports: PCIe ports on a root bus, with a hot-plug slot and AER (pcie_port.py).

The identity is QEMU's pcie-root-port (1b36:000c, class 0x060400); the type 1 registers are in
type1_header.py.
"""

from __future__ import annotations

from .pcie_port import HOST_REQUESTER_ID, PciePort
from .registers import PCI_EXP_TYPE_ROOT_PORT
from .topology import RootPortSpec
from .type1_header import IO_WINDOW_WRITABLE, MEMORY_WINDOW_WRITABLE

__all__ = ["HOST_REQUESTER_ID", "IO_WINDOW_WRITABLE", "MEMORY_WINDOW_WRITABLE", "RootPort"]


class RootPort(PciePort):
    kind = "root port"

    def __init__(self, spec: RootPortSpec) -> None:
        super().__init__(
            spec,
            port_type=PCI_EXP_TYPE_ROOT_PORT,
            port_number=spec.slot_number & 0xFF,
            physical_slot=spec.slot_number,
        )
