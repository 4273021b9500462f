"""Exit dispatch with made-up exits: no vCPU needed."""

from __future__ import annotations

import pytest

from pcihole.hv import exits
from pcihole.machine.bus import Bus, BusError
from pcihole.machine.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from pcihole.machine.dispatch import (
    ExitHandler,
    Stop,
    StopReason,
)
from pcihole.machine.serial import COM1_BASE, UART_REGISTERS, SerialConsole
from pcihole.machine.stats import RunStats


class Recorder:
    def __init__(self, value: bytes = b"\x11\x22\x33\x44\x55\x66\x77\x88"):
        self.value = value
        self.writes: list[tuple[int, bytes]] = []

    def read(self, addr: int, size: int) -> bytes:
        return self.value[:size]

    def write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, data))


@pytest.fixture
def machine():
    mmio, pio, stats = Bus("mmio"), Bus("pio"), RunStats()
    device = Recorder()
    mmio.insert(device, 0xE0000000, 0x1000, "fake ecam page")
    serial = SerialConsole()
    pio.insert(serial, COM1_BASE, UART_REGISTERS, "COM1")
    pio.insert(DebugExit(), DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, "debug-exit")
    return ExitHandler(mmio, pio, stats), device, serial, stats


def test_mmio_read_goes_to_the_device_and_is_counted(machine):
    handler, _device, _serial, stats = machine
    assert handler.handle(exits.MmioRead(0xE0000004, 2)) == b"\x11\x22"
    assert stats.exits.mmio_read == 1 and stats.exits.total == 1


def test_mmio_write_goes_to_the_device(machine):
    handler, device, _serial, stats = machine
    assert handler.handle(exits.MmioWrite(0xE0000010, b"\x01\x02")) is None
    assert device.writes == [(0xE0000010, b"\x01\x02")]
    assert stats.exits.mmio_write == 1


def test_unclaimed_mmio_reads_all_ones_and_is_remembered_once_per_page(machine):
    handler, _device, _serial, stats = machine
    assert handler.handle(exits.MmioRead(0xF0000000, 4)) == b"\xff" * 4
    assert handler.handle(exits.MmioRead(0xF0000008, 8)) == b"\xff" * 8
    assert stats.unclaimed_mmio == {0xF0000000}
    # A read that starts in the device but runs past its end is not the device's.
    assert handler.handle(exits.MmioRead(0xE0000FFE, 4)) == b"\xff" * 4


def test_serial_output_and_lsr(machine):
    handler, _device, serial, stats = machine
    for ch in b"ok\n":
        assert handler.handle(exits.IoOut(COM1_BASE, 1, bytes([ch]))) is None
    assert serial.text() == "ok\n"
    lsr = handler.handle(exits.IoIn(COM1_BASE + 5, 1))
    assert lsr == b"\x60"
    assert stats.exits.io == 4


def test_rep_outsb_writes_every_byte(machine):
    handler, _device, serial, _stats = machine
    handler.handle(exits.IoOut(COM1_BASE, 1, b"abc", count=3))
    assert serial.text() == "abc"


def test_unclaimed_port_reads_all_ones(machine):
    handler, _device, _serial, stats = machine
    assert handler.handle(exits.IoIn(0xCFC, 4)) == b"\xff" * 4
    assert handler.handle(exits.IoIn(0xCF8, 2, count=2)) == b"\xff" * 4
    assert stats.unclaimed_ports == {0xCFC, 0xCF8}


def test_debug_exit_stops_with_the_guest_status(machine):
    handler, *_ = machine
    assert handler.handle(exits.IoOut(DEBUG_EXIT_PORT, 1, b"\x07")) == Stop(StopReason.DEBUG_EXIT, 7)


@pytest.mark.parametrize(
    ("exit", "reason"),
    [
        (exits.Hlt(), StopReason.HALT),
        (exits.Shutdown(), StopReason.TRIPLE_FAULT),
        (exits.InternalError(1, (0x10,)), StopReason.INTERNAL_ERROR),
        (exits.Unknown(99), StopReason.UNKNOWN_EXIT),
    ],
)
def test_terminal_exits_stop(machine, exit, reason):
    handler, *_ = machine
    result = handler.handle(exit)
    assert isinstance(result, Stop) and result.reason == reason


def test_interrupted_runs_on_and_is_not_an_exit_to_count(machine):
    handler, _device, _serial, stats = machine
    assert handler.handle(exits.Interrupted()) is None
    assert stats.exits.total == 0


def test_bus_rejects_overlap_naming_both_ranges():
    bus = Bus("mmio")
    bus.insert(Recorder(), 0x1000, 0x1000, "a")
    with pytest.raises(BusError, match=r"b \[0x1800, 0x27ff\] overlaps a \[0x1000, 0x1fff\]"):
        bus.insert(Recorder(), 0x1800, 0x1000, "b")
    bus.insert(Recorder(), 0x2000, 0x10, "c")  # adjacent is fine
    assert bus.find(0x1FFF) is not None and bus.find(0x2010) is None
