"""Type 0 functions: endpoints (with BARs) and the host bridge function at 00:00.0 of each segment.

BARs are pure write masks (see config_space.py): the address bits above the size are read-write and
the type bits below are read-only, so writing all-ones and reading back gives ~(size - 1) | type,
which is how Linux's __pci_read_base() sizes them (PCIe 6.0 §7.5.1.2.1). A 64-bit BAR's upper
register is fully writable for sizes below 4 GiB. This is also what QEMU's pci_register_bar() sets up.
"""

from __future__ import annotations

from .function import INTERRUPT_PIN_INTA, PciFunction
from .pcie_capability import add_pcie_capability
from .registers import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_IO_MASK,
    PCI_BASE_ADDRESS_MEM_MASK,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_32,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_EXP_TYPE_ENDPOINT,
    PCI_EXP_TYPE_RC_END,
    PCI_HEADER_TYPE_NORMAL,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
)
from .topology import BAR_IO, BAR_MEM64, BarSpec, EndpointSpec, ExpanderSpec, HostBridgeSpec

BAR_REGISTER_SIZE = 4


def bar_offset(index: int) -> int:
    return PCI_BASE_ADDRESS_0 + BAR_REGISTER_SIZE * index


def bar_flags(bar: BarSpec) -> int:
    """The read-only low bits of a BAR: space, memory type, prefetchable."""
    if bar.kind == BAR_IO:
        return PCI_BASE_ADDRESS_SPACE_IO
    flags = PCI_BASE_ADDRESS_MEM_TYPE_64 if bar.kind == BAR_MEM64 else PCI_BASE_ADDRESS_MEM_TYPE_32
    return flags | (PCI_BASE_ADDRESS_MEM_PREFETCH if bar.prefetchable else 0)


class Endpoint(PciFunction):
    kind = "endpoint"

    def __init__(
        self, spec: EndpointSpec, *, root_complex_integrated: bool, conventional: bool = False
    ) -> None:
        super().__init__(spec.bdf, spec.name)
        self.init_common_header(
            vendor=spec.vendor,
            device=spec.device,
            class_code=spec.class_code,
            revision=spec.revision,
            layout=PCI_HEADER_TYPE_NORMAL,
            interrupt_pin=INTERRUPT_PIN_INTA,
        )
        self.config.init_int(PCI_SUBSYSTEM_VENDOR_ID, 2, spec.subsystem_vendor)
        self.config.init_int(PCI_SUBSYSTEM_ID, 2, spec.subsystem)
        for bar in spec.bars:
            self._init_bar(bar)
        # On the root bus a function is integrated in the Root Complex (type 9); below a port it is
        # an ordinary PCI Express Endpoint (type 0), §7.5.3.2. Below a conventional PCI-PCI bridge it
        # is a conventional function, as QEMU's virtio devices drop their PCIe capability on a
        # conventional bus (virtio_pci_realize: pci_bus_is_express()).
        self.pcie_cap: int | None = None
        if not conventional:
            self.pcie_cap = add_pcie_capability(
                self.config, PCI_EXP_TYPE_RC_END if root_complex_integrated else PCI_EXP_TYPE_ENDPOINT
            )

    def _init_bar(self, bar: BarSpec) -> None:
        address_mask = ~(bar.size - 1) & (
            PCI_BASE_ADDRESS_IO_MASK if bar.kind == BAR_IO else PCI_BASE_ADDRESS_MEM_MASK
        )
        offset = bar_offset(bar.index)
        self.config.init_int(offset, 4, bar_flags(bar))
        self.config.init_writable(offset, 4, address_mask & 0xFFFFFFFF)
        if bar.kind == BAR_MEM64:
            self.config.init_writable(offset + BAR_REGISTER_SIZE, 4, (address_mask >> 32) & 0xFFFFFFFF)


class HostBridgeFunction(PciFunction):
    """The host bridge function (class 0x060000) at <root bus>:00.0, a Root Complex Integrated Endpoint.

    QEMU's gpex puts the same ids there (hw/pci-host/gpex.c, gpex_root). Linux only needs it to exist:
    it is the first function found on the root bus and it claims no resources (no BARs).
    """

    kind = "host bridge"

    def __init__(self, spec: HostBridgeSpec) -> None:
        super().__init__(spec.bdf, spec.name)
        self.init_common_header(
            vendor=spec.vendor,
            device=spec.device,
            class_code=spec.class_code,
            revision=0,
            layout=PCI_HEADER_TYPE_NORMAL,
            interrupt_pin=0,
        )
        self.pcie_cap = add_pcie_capability(self.config, PCI_EXP_TYPE_RC_END)


class ExpanderFunction(PciFunction):
    """A PCIe expander bridge's function on the main root bus (QEMU pxb-pcie, 1b36:000b, class 0x060000).

    It is only a marker, as in QEMU (pxb_dev_realize: a host bridge class function with no BARs and,
    as QEMU 7.2 shows it, no capability at all): the root bus it opens is found by Linux through the
    expander's PNP0A08 in the DSDT (_BBN), and by the scan guest through the peer-bus scan.
    """

    kind = "expander bridge"

    def __init__(self, spec: ExpanderSpec) -> None:
        super().__init__(spec.bdf, spec.name)
        self.bus = spec.bus
        self.last_bus = spec.last_bus
        self.init_common_header(
            vendor=spec.vendor,
            device=spec.device,
            class_code=spec.class_code,
            revision=0,
            layout=PCI_HEADER_TYPE_NORMAL,
            interrupt_pin=0,
        )
