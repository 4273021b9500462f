"""Type 1 functions (PCIe 6.0 §7.5.1.3): what every bridge has, whatever kind of bridge it is.

Root ports, switch ports and PCI-PCI bridges share it (QEMU: pci_bridge_initfn() and the wmask set up
by pci_init_wmask_bridge() in hw/pci/pci.c). Bus numbers are programmed at power-on as firmware would
(Primary = the bridge's bus, Secondary, Subordinate) and stay read-write; Linux on x86 keeps firmware
bus numbers (pcibios_assign_all_busses() is false unless pci=assign-busses). Routing in `HostBridge`
follows the topology, not these registers: a guest that renumbers buses would see stale routing.
The windows (I/O 16-bit, memory, 64-bit prefetchable) reset to 0, as QEMU's do; Linux sizes and
programs them (pci_read_bridge_windows(), pci_setup_bridge()); nothing decodes them.
"""

from __future__ import annotations

from typing import Protocol

from .bdf import Bdf
from .function import INTERRUPT_PIN_INTA, PciFunction
from .registers import (
    PCI_BRIDGE_CONTROL,
    PCI_BRIDGE_CTL_WRITABLE,
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

# Window registers (§7.5.1.3.6-9): only the address bits are writable; the low nibble says the type.
IO_WINDOW_WRITABLE = 0xF0
MEMORY_WINDOW_WRITABLE = 0xFFF0


class BridgeSpec(Protocol):
    """What every bridge's spec in topology.py says of it (RootPortSpec, UpstreamPortSpec, ...)."""

    @property
    def bdf(self) -> Bdf: ...
    @property
    def name(self) -> str: ...
    @property
    def vendor(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def class_code(self) -> int: ...
    @property
    def revision(self) -> int: ...
    @property
    def secondary(self) -> int: ...
    @property
    def subordinate(self) -> int: ...


class Type1Function(PciFunction):
    """A bridge: the type 1 header with bus numbers, windows, Secondary Status and Bridge Control."""

    kind = "bridge"

    def __init__(self, spec: BridgeSpec, *, interrupt_pin: int = INTERRUPT_PIN_INTA) -> None:
        super().__init__(spec.bdf, spec.name)
        self.secondary = spec.secondary
        self.subordinate = spec.subordinate
        self.init_common_header(
            vendor=spec.vendor,
            device=spec.device,
            class_code=spec.class_code,
            revision=spec.revision,
            layout=PCI_HEADER_TYPE_BRIDGE,
            interrupt_pin=interrupt_pin,
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

    def record_unsupported_request(self, target: Bdf, register: int, byte_enables: int) -> None:
        """A configuration write to `target` below this bridge found no function.

        Secondary Status "Received Master Abort" (PCIe 6.0 §7.5.1.3.7: set "when the Secondary side
        ... receives a Completion with Unsupported Request Completion Status"); PCIe ports also log it
        in AER (pcie_port.py).
        """
        self.config.set_bits(PCI_SEC_STATUS, 2, PCI_STATUS_REC_MASTER_ABORT)
