"""One function's 4 KiB configuration space: bytes plus per-bit write masks.

This is QEMU's model (hw/pci/pci.c: config, wmask, w1cmask; pci_default_write_config): every bit is
read-only unless its `writable` bit is set (read-write) or its `write_1_to_clear` bit is set (RW1C,
PCIe 6.0 §7.4 "RW1C: ... writing 1b clears the bit; writing 0b has no effect"). A guest write of
`value` to a byte does

    new = (old & ~writable) | (value & writable)
    new &= ~(value & write_1_to_clear)

and nothing else, so BAR sizing works by masks alone: a BAR's writable bits are exactly its address
bits, so writing all-ones reads back the size mask with the read-only type flags below it
(PCIe 6.0 §7.5.1.2.1). The device model sets initial values and masks with the `init_*` helpers,
which bypass the masks (they are the hardware, not the guest).
"""

from __future__ import annotations

from .registers import PCI_CFG_SPACE_EXP_SIZE


class ConfigSpace:
    """Bytes and write masks of one function; not thread-safe (the host bridge holds the lock)."""

    __slots__ = ("data", "writable", "write_1_to_clear", "capability_sizes")

    def __init__(self, size: int = PCI_CFG_SPACE_EXP_SIZE) -> None:
        #: The bytes the guest reads: a bytearray, or the function's mirror page once attached.
        self.data: bytearray | memoryview = bytearray(size)
        self.writable = bytearray(size)
        self.write_1_to_clear = bytearray(size)
        # Length of each capability the model placed, by offset: not guest-visible, only used to place
        # the next one (configuration space itself does not record lengths).
        self.capability_sizes: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.data)

    def _check(self, offset: int, size: int) -> None:
        if size <= 0 or offset < 0 or offset + size > len(self.data):
            raise ValueError(
                f"config access [{offset:#x}, +{size}] is outside the {len(self.data):#x}-byte space"
            )

    # --- the mirror (config_mirror.py) -------------------------------------------------------------
    def attach(self, page: memoryview) -> None:
        """From now on the bytes live in `page` (the read-only mirror the guest reads without an
        exit): copied there once, then every change, by the guest or the device model, is made in
        the page itself."""
        if len(page) != len(self.data):
            raise ValueError(f"a mirror page of {len(page)} bytes for a {len(self.data):#x}-byte space")
        page[:] = self.data
        self.data = page

    def detach(self) -> bytearray:
        """The bytes go back to a private copy (the function left; its page is given back)."""
        own = bytearray(self.data)
        self.data = own
        return own

    # --- what the guest does ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`, as the guest sees them."""
        self._check(offset, size)
        return bytes(self.data[offset : offset + size])

    def read_int(self, offset: int, size: int) -> int:
        """A little-endian register value (PCI configuration space is little-endian)."""
        return int.from_bytes(self.read(offset, size), "little")

    def write(self, offset: int, data: bytes) -> None:
        """A guest write: apply the write masks byte by byte."""
        self._check(offset, len(data))
        for i, value in enumerate(data):
            at = offset + i
            rw = self.writable[at]
            w1c = self.write_1_to_clear[at]
            if not (rw | w1c):
                continue
            new = (self.data[at] & ~rw) | (value & rw)
            self.data[at] = new & ~(value & w1c) & 0xFF

    # --- what the device model does -------------------------------------------------------------------
    def init_int(self, offset: int, size: int, value: int) -> None:
        """Set a register's value regardless of the masks (reset values, hardware status changes)."""
        self._check(offset, size)
        self.data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set_bits(self, offset: int, size: int, bits: int) -> None:
        """Hardware sets status bits (e.g. an error was detected); the guest clears them with RW1C."""
        self.init_int(offset, size, self.read_int(offset, size) | bits)

    def clear_bits(self, offset: int, size: int, bits: int) -> None:
        self.init_int(offset, size, self.read_int(offset, size) & ~bits)

    def init_writable(self, offset: int, size: int, mask: int) -> None:
        """Declare which bits of a register the guest may write."""
        self._check(offset, size)
        self.writable[offset : offset + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def init_write_1_to_clear(self, offset: int, size: int, mask: int) -> None:
        """Declare which bits of a register are RW1C status bits."""
        self._check(offset, size)
        self.write_1_to_clear[offset : offset + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )
