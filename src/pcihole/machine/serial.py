"""A 16550A UART on COM1 (0x3f8, ISA IRQ 4), modelled on QEMU's hw/char/serial.c.

Registers (PC16550D data sheet; Linux's include/uapi/linux/serial_reg.h names): RBR/THR/DLL at +0,
IER/DLM at +1 (DLL/DLM while LCR.DLAB is set), IIR (read) / FCR (write) at +2, LCR +3, MCR +4,
LSR +5, MSR +6, SCR +7.

Transmission is instantaneous, as in QEMU when the chardev accepts the byte: a THR write leaves
THRE | TEMT set and, with IER.THRI, raises a THRE interrupt (serial_xmit -> thr_ipending = 1).
Reading IIR while it reports THRE clears that pending interrupt (serial_ioport_read, UART_IIR), so
Linux's serial8250 interrupt handler drains it as on hardware. Received bytes (`receive()`) go to a
16-byte FIFO and raise an RX interrupt while IER.RDI is set and data is ready; the FIFO trigger level
and the character timeout are not modelled (every byte is "enough" to interrupt, like trigger level 1).
The IRQ output follows serial_update_irq(): RLS > RX data > THRE > modem status, and the line is high
while IIR reports anything. MCR.OUT2 does not gate the line (QEMU does not model it either).

printk's console writes poll LSR.THRE; user space writes through the tty layer, which waits for the
THRE interrupt: both work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pcihole.machine.irq import IrqLine

COM1_BASE = 0x3F8
COM1_IRQ = 4
UART_REGISTERS = 8

UART_RX = UART_TX = UART_DLL = 0
UART_IER = UART_DLM = 1
UART_IIR = UART_FCR = 2
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_IER_RDI = 0x01
UART_IER_THRI = 0x02
UART_IER_RLSI = 0x04
UART_IER_MSI = 0x08

UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_FIFO_ENABLED = 0xC0

UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04

UART_LCR_DLAB = 0x80

UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10

UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LSR_INT_ANY = 0x1E

UART_MSR_DCD = 0x80
UART_MSR_DSR = 0x20
UART_MSR_CTS = 0x10
UART_MSR_ANY_DELTA = 0x0F

UART_FIFO_LENGTH = 16


class SerialConsole:
    """COM1. `output` collects what the guest sent; `receive()` delivers bytes to the guest."""

    def __init__(
        self,
        sink: Callable[[bytes], None] | None = None,
        base: int = COM1_BASE,
        irq: IrqLine | None = None,
    ) -> None:
        self.base = base
        self.output = bytearray()
        self._sink = sink
        self.irq = irq
        # serial_reset(): divisor 12 (9600 baud), LSR THRE|TEMT, MSR DCD|DSR|CTS, IIR no interrupt.
        self.divisor = 12
        self.ier = 0
        self.iir = UART_IIR_NO_INT
        self.lcr = 0
        self.mcr = UART_MCR_OUT2
        self.lsr = UART_LSR_TEMT | UART_LSR_THRE
        self.msr = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        self.scr = 0
        self.fcr = 0
        self.thr_ipending = False
        self.rx: deque[int] = deque()
        #: A line the host waits for (`watch()`); set to the matching line when it is printed.
        self._watch: str | None = None
        self._line = bytearray()
        self.matched: str | None = None

    def watch(self, text: str) -> None:
        """Remember the first complete output line containing `text` in `matched`."""
        self._watch = text
        self.matched = None

    # --- the host side ------------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes arriving on the line (serial_receive1): into the FIFO (overrun beyond it), then the IRQ."""
        for byte in data:
            if len(self.rx) >= (UART_FIFO_LENGTH if self.fcr & UART_FCR_ENABLE_FIFO else 1):
                self.lsr |= UART_LSR_OE
                continue
            self.rx.append(byte)
            self.lsr |= UART_LSR_DR
        self._update_irq()

    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")

    # --- the guest side -----------------------------------------------------------------------------

    def read(self, addr: int, size: int) -> bytes:
        return bytes([self._read_register(addr - self.base)]) + bytes(size - 1)

    def write(self, addr: int, data: bytes) -> None:
        self._write_register(addr - self.base, data[0])

    def _read_register(self, reg: int) -> int:
        if reg == UART_RX:
            if self.lcr & UART_LCR_DLAB:
                return self.divisor & 0xFF
            value = self.rx.popleft() if self.rx else 0
            if not self.rx:
                self.lsr &= ~(UART_LSR_DR | UART_LSR_BI)
            self._update_irq()
            return value
        if reg == UART_IER:
            return (self.divisor >> 8) & 0xFF if self.lcr & UART_LCR_DLAB else self.ier
        if reg == UART_IIR:
            value = self.iir
            if value & 0x7 == UART_IIR_THRI:
                self.thr_ipending = False
                self._update_irq()
            return value | (UART_IIR_FIFO_ENABLED if self.fcr & UART_FCR_ENABLE_FIFO else 0)
        if reg == UART_LCR:
            return self.lcr
        if reg == UART_MCR:
            return self.mcr
        if reg == UART_LSR:
            value = self.lsr
            # Break and overrun clear on read (serial_ioport_read, UART_LSR).
            if self.lsr & (UART_LSR_BI | UART_LSR_OE):
                self.lsr &= ~(UART_LSR_BI | UART_LSR_OE)
                self._update_irq()
            return value
        if reg == UART_MSR:
            if self.mcr & UART_MCR_LOOP:
                # Loopback: DTR -> DSR, RTS -> CTS, OUT1 -> RI, OUT2 -> DCD.
                m = self.mcr
                return (m & 0x0C) << 4 | (m & UART_MCR_RTS) << 3 | (m & UART_MCR_DTR) << 5
            return self.msr
        return self.scr

    def _write_register(self, reg: int, value: int) -> None:
        if reg == UART_TX:
            if self.lcr & UART_LCR_DLAB:
                self.divisor = (self.divisor & 0xFF00) | value
                return
            if self.mcr & UART_MCR_LOOP:
                self.receive(bytes([value]))
            else:
                byte = bytes([value])
                self.output += byte
                if self._sink is not None:
                    self._sink(byte)
                if self._watch is not None:
                    self._check_line(value)
            # The byte left at once: the holding register is empty again (serial_xmit).
            self.lsr |= UART_LSR_THRE | UART_LSR_TEMT
            self.thr_ipending = True
            self._update_irq()
        elif reg == UART_IER:
            if self.lcr & UART_LCR_DLAB:
                self.divisor = (self.divisor & 0x00FF) | value << 8
                return
            changed = (self.ier ^ value) & 0x0F
            self.ier = value & 0x0F
            if changed & UART_IER_THRI:
                # Enabling THRI with THR empty interrupts at once (serial_ioport_write, UART_IER).
                self.thr_ipending = bool(self.ier & UART_IER_THRI and self.lsr & UART_LSR_THRE)
            if changed:
                self._update_irq()
        elif reg == UART_FCR:
            if value & UART_FCR_CLEAR_RCVR:
                self.rx.clear()
                self.lsr &= ~(UART_LSR_DR | UART_LSR_BI)
            self.fcr = value & 0xC9
            self._update_irq()
        elif reg == UART_LCR:
            self.lcr = value
        elif reg == UART_MCR:
            self.mcr = value & 0x1F
        elif reg == UART_SCR:
            self.scr = value
        # LSR and MSR are read-only here (QEMU ignores writes to them).

    def _check_line(self, value: int) -> None:
        if value != 0x0A:
            self._line.append(value)
            return
        line = self._line.decode("utf-8", errors="replace")
        self._line.clear()
        if self.matched is None and self._watch is not None and self._watch in line:
            self.matched = line.rstrip("\r")

    def _update_irq(self) -> None:
        """serial_update_irq(): the highest-priority pending source goes into IIR; the line follows."""
        ier, lsr = self.ier, self.lsr
        if ier & UART_IER_RLSI and lsr & UART_LSR_INT_ANY:
            pending = UART_IIR_RLSI
        elif ier & UART_IER_RDI and lsr & UART_LSR_DR:
            pending = UART_IIR_RDI
        elif ier & UART_IER_THRI and self.thr_ipending:
            pending = UART_IIR_THRI
        elif ier & UART_IER_MSI and self.msr & UART_MSR_ANY_DELTA:
            pending = UART_IIR_MSI
        else:
            pending = UART_IIR_NO_INT
        self.iir = pending | (self.iir & 0xF0)
        if self.irq is not None:
            self.irq.set(pending != UART_IIR_NO_INT)
