"""PCIe ports (root, switch upstream and downstream): a bridge with the PCIe capability and AER.

A port logs an Unsupported Request for a configuration write below it that reaches no function, in
Secondary Status and in its AER registers (aer.py), with the CfgWr0 header when the target is on the
port's secondary bus and CfgWr1 further down. Root and downstream ports have a hot-plug slot below
them (pcie_capability.py): Presence Detect and the link follow what is on the secondary bus.
"""

from __future__ import annotations

from .aer import add_aer_capability, config_write_tlp_header, record_unsupported_request
from .bdf import Bdf
from .function import INTERRUPT_PIN_INTA
from .pcie_capability import add_pcie_capability, set_link_up
from .registers import PCI_EXP_TYPE_DOWNSTREAM, PCI_EXP_TYPE_ROOT_PORT
from .type1_header import BridgeSpec, Type1Function

HOST_REQUESTER_ID = 0x0000  # configuration requests from the CPU carry the Root Complex's ID, 00:00.0


class PciePort(Type1Function):
    """A type 1 function with the PCIe capability (`port_type`) and AER at 0x100."""

    def __init__(
        self,
        spec: BridgeSpec,
        *,
        port_type: int,
        port_number: int,
        physical_slot: int | None,
        interrupt_pin: int = INTERRUPT_PIN_INTA,
    ) -> None:
        super().__init__(spec, interrupt_pin=interrupt_pin)
        self.pcie_cap = add_pcie_capability(
            self.config, port_type, port_number=port_number, physical_slot=physical_slot
        )
        self.aer_cap = add_aer_capability(self.config, root_port=port_type == PCI_EXP_TYPE_ROOT_PORT)
        self.has_slot = port_type in (PCI_EXP_TYPE_ROOT_PORT, PCI_EXP_TYPE_DOWNSTREAM)
        self.occupied = False

    def set_slot_occupied(self, occupied: bool, *, hotplug: bool) -> None:
        """A device appeared on or left the secondary bus; `hotplug` also sets the RW1C change bits."""
        if occupied != self.occupied:
            set_link_up(self.config, self.pcie_cap, occupied, report_change=hotplug)
            self.occupied = occupied

    def record_unsupported_request(self, target: Bdf, register: int, byte_enables: int) -> None:
        """Secondary Status (Type1Function), then aer.record_unsupported_request with the CfgWr0
        (target on the secondary bus) or CfgWr1 header."""
        super().record_unsupported_request(target, register, byte_enables)
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
