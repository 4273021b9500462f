"""The transmit side of a 16550 UART at COM1 (0x3f8), enough for a guest's console output.

Registers (PC16550D data sheet): THR at +0 (write), LSR at +5 (read). LSR reads 0x60 (THRE | TEMT:
the transmitter is always empty) so that a guest that polls before each byte never waits. Other
registers read 0 and ignore writes; no interrupts are raised.
"""

from __future__ import annotations

from collections.abc import Callable

COM1_BASE = 0x3F8
UART_REGISTERS = 8
UART_THR = 0
UART_LSR = 5
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40


class SerialConsole:
    def __init__(self, sink: Callable[[bytes], None] | None = None, base: int = COM1_BASE) -> None:
        self.base = base
        self.output = bytearray()
        self._sink = sink

    def read(self, addr: int, size: int) -> bytes:
        value = UART_LSR_THRE | UART_LSR_TEMT if addr - self.base == UART_LSR else 0
        return bytes([value]) + bytes(size - 1)

    def write(self, addr: int, data: bytes) -> None:
        if addr - self.base == UART_THR:
            byte = data[:1]
            self.output += byte
            if self._sink is not None:
                self._sink(byte)

    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")
