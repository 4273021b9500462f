"""The reviewer's alternative to KVM_MEM_PCI_HOLE: an in-kernel MMIO-bus device with a fill value.

Sean Christopherson, 2020-08-13: "add a KVM_MMIO_BUS device similar to coalesced MMIO ... it would
allow handling even writes wholly within the kernel ... and it'd allow stuffing a value other than
0xff". It was never written; this is the model's version, with these rules:

- It sits on KVM_MMIO_BUS like a coalesced zone, so it is only reached where no memslot maps the
  gpa (the MMU takes a memslot first; only an emulated MMIO access goes to the bus), and it obeys
  kvm_io_bus rules: NR_IOBUS_DEVS devices per bus (ENOSPC), overlapping ranges allowed, the first
  device in bus order that accepts an access handles it (io_bus.py).
- A read of [addr, addr+len) wholly inside the device returns `len` fill bytes with no exit.
- A write is dropped in the "kernel" (no exit) unless the device was registered with
  KVM_MMIO_FILL_WRITES_EXIT; then the device declines it (-EOPNOTSUPP) and the write goes on down
  the bus (e.g. to a coalesced zone) or exits as KVM_EXIT_MMIO.
- register: EINVAL for size 0, a range that wraps, a fill outside 0..255 or an unknown flag.
  unregister: removes the device registered with exactly (addr, size); ENOENT if there is none
  (kvm_io_bus_unregister_dev's answer for an unknown device in older kernels, and
  kvm_deassign_ioeventfd's for no match).
"""

from __future__ import annotations

import errno

from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.io_bus import U64, IoBus
from pcihole.hv.proposed import KVM_MMIO_FILL_WRITES_EXIT

KVM_MMIO_FILL_VALID_FLAGS = KVM_MMIO_FILL_WRITES_EXIT
# kvm_io_range.len is a C int.
MMIO_FILL_MAX_SIZE = (1 << 31) - 1


class MmioFillDevice:
    """One registered fill range."""

    def __init__(self, addr: int, size: int, fill: int, flags: int) -> None:
        self.addr = addr
        self.size = size
        self.fill = fill
        self.flags = flags
        self._fill_bytes = bytes([fill]) * 8

    @property
    def writes_exit(self) -> bool:
        return bool(self.flags & KVM_MMIO_FILL_WRITES_EXIT)

    def read(self, addr: int, length: int) -> bytes | None:
        if length <= 8:
            return self._fill_bytes[:length]
        return bytes([self.fill]) * length

    def write(self, addr: int, data: bytes) -> bool:
        return not self.writes_exit

    def __repr__(self) -> str:
        return (
            f"<MmioFillDevice [{self.addr:#x}, +{self.size:#x}) fill={self.fill:#04x} flags={self.flags:#x}>"
        )


class MmioFillDevices:
    """KVM_REGISTER_MMIO_FILL / KVM_UNREGISTER_MMIO_FILL of one VM (model-only ioctls)."""

    def __init__(self, mmio_bus: IoBus) -> None:
        self.bus = mmio_bus
        self.devices: list[MmioFillDevice] = []

    def register(self, addr: int, size: int, fill: int = 0xFF, flags: int = 0) -> None:
        detail = f"addr={addr:#x}, size={size:#x}, fill={fill:#x}, flags={flags:#x}"
        ioctl = "KVM_REGISTER_MMIO_FILL"
        if flags & ~KVM_MMIO_FILL_VALID_FLAGS:
            raise ModelKvmError(errno.EINVAL, ioctl, detail, "unknown flags")
        if not 0 <= fill <= 0xFF:
            raise ModelKvmError(errno.EINVAL, ioctl, detail, "fill must be one byte")
        if not 0 < size <= MMIO_FILL_MAX_SIZE or addr < 0 or addr + size - 1 > U64:
            raise ModelKvmError(errno.EINVAL, ioctl, detail, "empty, too large, or wrapping range")
        dev = MmioFillDevice(addr, size, fill, flags)
        self.bus.register(addr, size, dev, ioctl, detail)
        self.devices.append(dev)

    def unregister(self, addr: int, size: int) -> None:
        for dev in self.devices:
            if dev.addr == addr and dev.size == size:
                self.bus.unregister(dev)
                self.devices.remove(dev)
                return
        raise ModelKvmError(
            errno.ENOENT, "KVM_UNREGISTER_MMIO_FILL", f"addr={addr:#x}, size={size:#x}", "no such fill device"
        )
