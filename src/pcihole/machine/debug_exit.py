"""QEMU's isa-debug-exit at port 0xf4: a guest write ends the run with that value as its status.

QEMU exits with (value << 1) | 1 (hw/misc/debugexit.c); pcihole reports the value itself.
"""

from __future__ import annotations

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4


class GuestExited(Exception):
    """Raised by the device to end the run loop; `status` is what the guest wrote."""

    def __init__(self, status: int) -> None:
        super().__init__(f"guest wrote {status:#x} to the debug-exit port")
        self.status = status


class DebugExit:
    def read(self, addr: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, addr: int, data: bytes) -> None:
        raise GuestExited(int.from_bytes(data, "little"))
