"""A PCI function as the guest sees it: an address, a configuration space, and what kind of thing it is.

The registers every function has (PCIe 6.0 §7.5.1.1, the part common to type 0 and type 1 headers)
are set up here; `endpoint.py` and `root_port.py` add the layout-specific ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bdf import Bdf
from .config_space import ConfigSpace
from .registers import (
    PCI_CACHE_LINE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_WRITABLE,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_HEADER_TYPE_LAYOUT,
    PCI_HEADER_TYPE_MFD,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_ERROR_BITS,
    PCI_VENDOR_ID,
)

INTERRUPT_PIN_INTA = 1


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One line of the device list (`pcihole run` prints these; `--json` as `as_json()`)."""

    bdf: Bdf
    vendor: int
    device: int
    class_code: int
    header_type: int  # the layout, 0 (endpoint) or 1 (bridge), without the multi-function bit
    multifunction: bool
    kind: str  # "host bridge", "expander bridge", "root port", "upstream port", "downstream port", ...
    name: str = ""

    def as_json(self) -> dict[str, object]:
        """One entry of `pcihole run --json`'s "devices" list (docs/design.md)."""
        return {
            "bdf": str(self.bdf),
            "vendor": f"{self.vendor:#06x}",
            "device": f"{self.device:#06x}",
            "class": f"{self.class_code:#08x}",
            "header_type": self.header_type,
        }


class PciFunction:
    """Base of the function models; `config` is guarded by the owning HostBridge's lock."""

    kind = "function"

    def __init__(self, bdf: Bdf, name: str = "") -> None:
        self.bdf = bdf
        self.name = name
        self.config = ConfigSpace()

    def init_common_header(
        self, *, vendor: int, device: int, class_code: int, revision: int, layout: int, interrupt_pin: int
    ) -> None:
        c = self.config
        c.init_int(PCI_VENDOR_ID, 2, vendor)
        c.init_int(PCI_DEVICE_ID, 2, device)
        c.init_writable(PCI_COMMAND, 2, PCI_COMMAND_WRITABLE)
        c.init_write_1_to_clear(PCI_STATUS, 2, PCI_STATUS_ERROR_BITS)
        c.init_int(PCI_REVISION_ID, 1, revision)
        c.init_int(PCI_CLASS_PROG, 3, class_code)
        c.init_writable(PCI_CACHE_LINE_SIZE, 1, 0xFF)  # read-write with no effect on PCIe (§7.5.1.1.7)
        c.init_int(PCI_HEADER_TYPE, 1, layout)
        c.init_writable(PCI_INTERRUPT_LINE, 1, 0xFF)  # scratch register for the OS
        c.init_int(PCI_INTERRUPT_PIN, 1, interrupt_pin)

    # --- identity, read from configuration space (what the guest sees) ----------------------------------
    @property
    def vendor(self) -> int:
        return self.config.read_int(PCI_VENDOR_ID, 2)

    @property
    def device(self) -> int:
        return self.config.read_int(PCI_DEVICE_ID, 2)

    @property
    def class_code(self) -> int:
        return self.config.read_int(PCI_CLASS_PROG, 3)

    @property
    def header_type(self) -> int:
        """The Header Type register, multi-function bit included."""
        return self.config.read_int(PCI_HEADER_TYPE, 1)

    def set_multifunction(self, multifunction: bool) -> None:
        """Function 0 of a device with other functions has Header Type bit 7 set (PCIe 6.0 §7.5.1.1.9)."""
        if multifunction:
            self.config.set_bits(PCI_HEADER_TYPE, 1, PCI_HEADER_TYPE_MFD)
        else:
            self.config.clear_bits(PCI_HEADER_TYPE, 1, PCI_HEADER_TYPE_MFD)

    def info(self) -> DeviceInfo:
        header_type = self.header_type
        return DeviceInfo(
            bdf=self.bdf,
            vendor=self.vendor,
            device=self.device,
            class_code=self.class_code,
            header_type=header_type & PCI_HEADER_TYPE_LAYOUT,
            multifunction=bool(header_type & PCI_HEADER_TYPE_MFD),
            kind=self.kind,
            name=self.name,
        )
