"""Root ports: type 1 functions on the root bus, with the PCIe capability (Root Port, hot-plug slot) and AER.

The identity is QEMU's pcie-root-port (1b36:000c, class 0x060400). Bus numbers are programmed at
power-on as firmware would (Primary = the port's bus, Secondary, Subordinate) and stay read-write;
Linux on x86 keeps firmware bus numbers (pcibios_assign_all_busses() is false unless pci=assign-busses).
Routing in `HostBridge` follows the topology, not these registers: a guest that renumbers buses
would see stale routing. The memory and I/O windows reset to 0, as QEMU's do; nothing decodes them.
"""

from __future__ import annotations

from .aer import add_aer_capability, config_write_tlp_header, record_unsupported_request
from .bdf import Bdf
from .function import INTERRUPT_PIN_INTA, PciFunction
from .pcie_capability import add_pcie_capability, set_link_up
from .registers import (
    PCI_BRIDGE_CONTROL,
    PCI_BRIDGE_CTL_WRITABLE,
    PCI_EXP_TYPE_ROOT_PORT,
    PCI_HEADER_TYPE_BRIDGE,
    PCI_IO_BASE,
    PCI_IO_LIMIT,
    PCI_IO_RANGE_TYPE_16,
    PCI_MEMORY_BASE,
    PCI_MEMORY_LIMIT,
    PCI_PREF_BASE_UPPER32,
    PCI_PREF_LIMIT_UPPER32,
    PCI_PREF_MEMORY_BASE,
    PCI_PREF_MEMORY_LIMIT,
    PCI_PREF_RANGE_TYPE_64,
    PCI_PRIMARY_BUS,
    PCI_SEC_STATUS,
    PCI_SECONDARY_BUS,
    PCI_STATUS_ERROR_BITS,
    PCI_STATUS_REC_MASTER_ABORT,
    PCI_SUBORDINATE_BUS,
)
from .topology import RootPortSpec

# Window registers (§7.5.1.3.6-9): only the address bits are writable; the low nibble says the type.
IO_WINDOW_WRITABLE = 0xF0
MEMORY_WINDOW_WRITABLE = 0xFFF0
HOST_REQUESTER_ID = 0x0000  # configuration requests from the CPU carry the Root Complex's ID, 00:00.0


class RootPort(PciFunction):
    kind = "root port"

    def __init__(self, spec: RootPortSpec) -> None:
        super().__init__(spec.bdf, spec.name)
        self.secondary = spec.secondary
        self.subordinate = spec.subordinate
        self.init_common_header(
            vendor=spec.vendor,
            device=spec.device,
            class_code=spec.class_code,
            revision=0,
            layout=PCI_HEADER_TYPE_BRIDGE,
            interrupt_pin=INTERRUPT_PIN_INTA,
        )
        c = self.config
        for offset, value in (
            (PCI_PRIMARY_BUS, spec.bdf.bus),
            (PCI_SECONDARY_BUS, spec.secondary),
            (PCI_SUBORDINATE_BUS, spec.subordinate),
        ):
            c.init_int(offset, 1, value)
            c.init_writable(offset, 1, 0xFF)
        c.init_write_1_to_clear(PCI_SEC_STATUS, 2, PCI_STATUS_ERROR_BITS)
        c.init_int(PCI_IO_BASE, 1, PCI_IO_RANGE_TYPE_16)
        c.init_int(PCI_IO_LIMIT, 1, PCI_IO_RANGE_TYPE_16)
        c.init_writable(PCI_IO_BASE, 1, IO_WINDOW_WRITABLE)
        c.init_writable(PCI_IO_LIMIT, 1, IO_WINDOW_WRITABLE)
        c.init_writable(PCI_MEMORY_BASE, 2, MEMORY_WINDOW_WRITABLE)
        c.init_writable(PCI_MEMORY_LIMIT, 2, MEMORY_WINDOW_WRITABLE)
        c.init_int(PCI_PREF_MEMORY_BASE, 2, PCI_PREF_RANGE_TYPE_64)
        c.init_int(PCI_PREF_MEMORY_LIMIT, 2, PCI_PREF_RANGE_TYPE_64)
        c.init_writable(PCI_PREF_MEMORY_BASE, 2, MEMORY_WINDOW_WRITABLE)
        c.init_writable(PCI_PREF_MEMORY_LIMIT, 2, MEMORY_WINDOW_WRITABLE)
        c.init_writable(PCI_PREF_BASE_UPPER32, 4, 0xFFFFFFFF)
        c.init_writable(PCI_PREF_LIMIT_UPPER32, 4, 0xFFFFFFFF)
        c.init_writable(PCI_BRIDGE_CONTROL, 2, PCI_BRIDGE_CTL_WRITABLE)
        self.pcie_cap = add_pcie_capability(
            c, PCI_EXP_TYPE_ROOT_PORT, port_number=spec.slot_number & 0xFF, physical_slot=spec.slot_number
        )
        self.aer_cap = add_aer_capability(c, root_port=True)
        self.occupied = False

    def set_slot_occupied(self, occupied: bool, *, hotplug: bool) -> None:
        """A device appeared on or left the secondary bus; `hotplug` also sets the RW1C change bits."""
        if occupied != self.occupied:
            set_link_up(self.config, self.pcie_cap, occupied, report_change=hotplug)
            self.occupied = occupied

    def record_unsupported_request(self, target: Bdf, register: int, byte_enables: int) -> None:
        """A configuration write to `target` below this port found no function: log what a port logs.

        Secondary Status "Received Master Abort" (PCIe 6.0 §7.5.1.3.7: set "when the Secondary side
        ... receives a Completion with Unsupported Request Completion Status"), then the error logging
        of aer.record_unsupported_request with the CfgWr0 (target on the secondary bus) or CfgWr1 header.
        """
        self.config.set_bits(PCI_SEC_STATUS, 2, PCI_STATUS_REC_MASTER_ABORT)
        header = config_write_tlp_header(
            type1=target.bus != self.secondary,
            requester_id=HOST_REQUESTER_ID,
            bus=target.bus,
            device=target.device,
            function=target.function,
            register=register,
            byte_enables=byte_enables,
        )
        record_unsupported_request(
            self.config, pcie_cap=self.pcie_cap, aer_cap=self.aer_cap, tlp_header=header
        )
