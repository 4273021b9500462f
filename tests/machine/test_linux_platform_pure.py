"""Pure tests of what the machine gives a Linux guest: the 16550's registers and interrupt line, the
ACPI sleep/reset port, exit dispatch of power events and internal errors, the host-quirk switch and
its decoding of KVM's emulation-failure data, CPUID normalisation, and the E820 map with an initrd."""

from __future__ import annotations

import ctypes
import struct

import pytest

from pcihole.boot.pvh import E820_RAM, E820_RESERVED
from pcihole.hv import cpu_setup, exits, uapi
from pcihole.machine import layout
from pcihole.machine.acpi_power import ACPI_POWER_PORT, AcpiPowerDevice
from pcihole.machine.builder import e820_map
from pcihole.machine.bus import Bus
from pcihole.machine.dispatch import ExitHandler, StopReason
from pcihole.machine.host_quirks import (
    NO_QUIRKS,
    HostQuirksError,
    choose_host_quirks,
    kernel_args,
    reported_instruction,
)
from pcihole.machine.irq import IrqLine
from pcihole.machine.machinefile import load_default
from pcihole.machine.serial import COM1_BASE, SerialConsole
from pcihole.machine.stats import RunStats
from pcihole.pci.host_bridge import HostBridge

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = (COM1_BASE + i for i in (0, 1, 2, 3, 4, 5, 6, 7))


class Lines:
    """An interrupt controller that records every level it is driven to."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def set_irq_line(self, gsi: int, level: bool) -> None:
        self.calls.append((gsi, level))


@pytest.fixture
def uart():
    lines = Lines()
    out: list[bytes] = []
    return SerialConsole(out.append, irq=IrqLine(lines, 4)), lines, out


def rd(uart: SerialConsole, port: int) -> int:
    return uart.read(port, 1)[0]


def test_uart_reset_state_and_scratch(uart):
    u, lines, _ = uart
    assert rd(u, LSR) == 0x60 and rd(u, IIR) == 0x01 and rd(u, IER) == 0
    assert rd(u, MSR) == 0xB0  # DCD | DSR | CTS
    u.write(SCR, b"\x5a")
    assert rd(u, SCR) == 0x5A
    assert lines.calls == []


def test_uart_ier_readback_test_of_8250_autoconfig(uart):
    # serial8250 autoconfig(): IER written 0 reads 0, written 0x0f reads 0x0f.
    u, _, _ = uart
    u.write(IER, b"\x00")
    assert rd(u, IER) == 0
    u.write(IER, b"\x0f")
    assert rd(u, IER) == 0x0F
    u.write(IER, b"\xff")
    assert rd(u, IER) == 0x0F  # only the low four bits exist


def test_uart_divisor_latch(uart):
    u, _, _ = uart
    u.write(LCR, b"\x83")
    u.write(THR, b"\x01")
    u.write(IER, b"\x00")
    assert (rd(u, THR), rd(u, IER)) == (1, 0)
    u.write(LCR, b"\x03")
    assert rd(u, IER) == 0 and u.divisor == 1


def test_thre_interrupt_raised_by_ier_and_each_byte_and_cleared_by_iir_read(uart):
    u, lines, out = uart
    u.write(IER, b"\x02")
    assert lines.calls == [(4, True)] and rd(u, IIR) & 0x0F == 0x02
    assert lines.calls == [(4, True), (4, False)]  # reading IIR cleared the THRE interrupt
    assert rd(u, IIR) == 0x01
    u.write(THR, b"A")
    assert out == [b"A"] and lines.calls[-1] == (4, True)
    u.write(IER, b"\x00")
    assert lines.calls[-1] == (4, False)


def test_rx_interrupt_until_the_fifo_is_empty(uart):
    u, lines, _ = uart
    u.write(IIR, b"\x01")  # FCR: FIFO on (16 bytes)
    assert rd(u, IIR) & 0xC0 == 0xC0
    u.write(IER, b"\x01")
    assert lines.calls == []
    u.receive(b"hi")
    assert lines.calls == [(4, True)] and rd(u, LSR) & 0x01 and rd(u, IIR) & 0x0F == 0x04
    assert rd(u, THR) == ord("h")
    assert lines.calls == [(4, True)]  # still data
    assert rd(u, THR) == ord("i")
    assert lines.calls == [(4, True), (4, False)] and not rd(u, LSR) & 0x01


def test_rx_priority_over_thre_and_overrun(uart):
    u, _, _ = uart
    u.write(IER, b"\x07")
    u.receive(b"x")
    assert rd(u, IIR) & 0x0F == 0x04  # RX data before THRE
    u.receive(b"yz")  # no FIFO: one byte of holding register, the rest overruns
    assert rd(u, IIR) & 0x0F == 0x06  # receiver line status first
    assert rd(u, LSR) & 0x02  # OE, cleared by the read
    assert not rd(u, LSR) & 0x02


def test_loopback_moves_modem_control_to_status_and_bytes_to_rx(uart):
    u, _, out = uart
    u.write(MCR, b"\x1f")
    assert rd(u, MSR) & 0xF0 == 0xF0
    u.write(THR, b"Q")
    assert out == [] and rd(u, THR) == ord("Q")


def test_irq_line_forwards_only_changes():
    lines = Lines()
    line = IrqLine(lines, 9)
    for level in (True, True, False, False, True):
        line.set(level)
    assert lines.calls == [(9, True), (9, False), (9, True)] and line.raised == 2


def test_acpi_power_port_power_off_reset_and_others():
    pio, stats = Bus("pio"), RunStats()
    pio.insert(AcpiPowerDevice(), ACPI_POWER_PORT, 1, "acpi")
    handler = ExitHandler(Bus("mmio"), pio, stats)
    assert handler.handle(exits.IoOut(ACPI_POWER_PORT, 1, b"\x80")) is None  # WAK_STS: nothing
    assert handler.handle(exits.IoOut(ACPI_POWER_PORT, 1, b"\x14")) is None  # SLP_TYP 5 without SLP_EN
    assert handler.handle(exits.IoIn(ACPI_POWER_PORT, 1)) == b"\x00"
    stop = handler.handle(exits.IoOut(ACPI_POWER_PORT, 1, b"\x34"))
    assert stop.reason == StopReason.POWER_OFF and stop.status == 0
    assert handler.handle(exits.IoOut(ACPI_POWER_PORT, 1, b"\x01")).reason == StopReason.REBOOT


def test_system_events_end_the_run_as_power_off_and_reboot():
    handler = ExitHandler(Bus("mmio"), Bus("pio"), RunStats())
    assert handler.handle(exits.SystemEvent(uapi.KVM_SYSTEM_EVENT_SHUTDOWN)).reason == StopReason.POWER_OFF
    assert handler.handle(exits.SystemEvent(uapi.KVM_SYSTEM_EVENT_RESET)).reason == StopReason.REBOOT


def test_internal_error_hook_runs_on_or_describes():
    stats = RunStats()
    fixed = []
    handler = ExitHandler(
        Bus("mmio"),
        Bus("pio"),
        stats,
        on_internal_error=lambda e: fixed.append(e) or e.suberror == 1,
        describe_internal_error=lambda e: f"described {e.suberror}",
    )
    assert handler.handle(exits.InternalError(1, ())) is None and stats.quirk_fixups == 1
    stop = handler.handle(exits.InternalError(3, ()))
    assert stop.reason == StopReason.INTERNAL_ERROR and stop.detail == "described 3"


def test_emulation_failure_instruction_bytes_are_decoded():
    # struct { u64 flags; u8 insn_size; u8 insn_bytes[15]; } as kvm_run's data words.
    packed = bytes([3]) + bytes([0x0F, 0x01, 0xCA]) + bytes(12)
    words = struct.unpack("<QQ", packed)
    e = exits.InternalError(uapi.KVM_INTERNAL_ERROR_EMULATION, (1, *words))
    assert reported_instruction(e) == b"\x0f\x01\xca"
    assert reported_instruction(exits.InternalError(1, (0, *words))) is None  # flag clear: no bytes
    assert reported_instruction(exits.InternalError(2, (1, *words))) is None


def test_host_quirks_switch(tmp_path):
    absent = str(tmp_path / "no_kvm_pvm")
    present = tmp_path / "kvm_pvm"
    present.mkdir()
    assert choose_host_quirks("none", "kvm") is NO_QUIRKS
    assert choose_host_quirks("auto", "kvm", module_path=absent).name == "none"
    assert choose_host_quirks("auto", "model", module_path=str(present)).name == "none"
    pvm = choose_host_quirks("auto", "kvm", module_path=str(present))
    assert pvm.name == "pvm" and pvm.fix_int3 and pvm.step_fwait and "smap" in pvm.hide_features
    assert choose_host_quirks("pvm", "model").name == "pvm"
    args = kernel_args(pvm)
    clear = next(a for a in args if a.startswith("clearcpuid="))
    assert set(clear.removeprefix("clearcpuid=").split(",")) == set(pvm.hide_features)
    assert any(a.startswith("initcall_blacklist=") and "trace_eval_init" in a for a in args)
    assert kernel_args(NO_QUIRKS) == []
    with pytest.raises(HostQuirksError, match="choose from"):
        choose_host_quirks("fast", "kvm")


def fake_supported_cpuid() -> ctypes.Structure:
    leaves = [
        (1, 0, 0x00A10F11, 0x05020800, (1 << 13) | (1 << 26) | (1 << 30), 1 << 28),
        (7, 0, 0, (1 << 0) | (1 << 20) | (1 << 7), 0, 0),
        (0xD, 0, 7, 0x340, 0x340, 0),
        (0x40000000, 0, 0x40000001, *struct.unpack("<III", b"KVMKVMKVM\0\0\0")),
    ]
    table = uapi.cpuid2_with(len(leaves))()
    table.nent = len(leaves)
    for i, (fn, idx, a, b, c, d) in enumerate(leaves):
        e = table.entries[i]
        e.function, e.index, e.eax, e.ebx, e.ecx, e.edx = fn, idx, a, b, c, d
    return table


def test_cpuid_normalisation_hides_features_and_sets_apic_id():
    out = cpu_setup.normalise_cpuid(
        fake_supported_cpuid(), vcpu_id=3, hide=["smap", "xsave", "cx16", "fsgsbase"]
    )
    by_leaf = {out.entries[i].function: out.entries[i] for i in range(out.nent)}
    leaf1, leaf7 = by_leaf[1], by_leaf[7]
    assert leaf1.ebx >> 24 == 3 and (leaf1.ebx >> 16) & 0xFF == 1 and not leaf1.edx & 1 << 28
    assert leaf1.ecx & 1 << 31  # hypervisor
    assert not leaf1.ecx & (1 << 13 | 1 << 26) and leaf1.ecx & 1 << 30  # cx16, xsave off; rdrand kept
    assert leaf7.ebx == 1 << 7  # smap and fsgsbase off, smep kept
    assert (by_leaf[0xD].eax, by_leaf[0xD].ebx) == (0, 0)
    assert cpu_setup.cpuid_signature(out) == b"KVMKVMKVM\0\0\0"
    with pytest.raises(cpu_setup.UnknownCpuFeature, match="sse9"):
        cpu_setup.normalise_cpuid(fake_supported_cpuid(), vcpu_id=0, hide=["sse9"])


def test_set_lint_makes_lint0_extint_and_lint1_nmi():
    state = uapi.kvm_lapic_state()
    ctypes.memmove(ctypes.addressof(state) + cpu_setup.APIC_LVT0, struct.pack("<I", 0x10700 | 0x200), 4)
    out = cpu_setup.set_lint(state)
    raw = ctypes.string_at(ctypes.addressof(out), uapi.KVM_APIC_REG_SIZE)
    assert struct.unpack_from("<I", raw, cpu_setup.APIC_LVT0)[0] == 0x10700
    assert struct.unpack_from("<I", raw, cpu_setup.APIC_LVT1)[0] == 0x400


def test_e820_reserves_the_initrd_and_keeps_ram_around_it():
    host_bridge = HostBridge(load_default().topology)
    ram = 512 << 20
    start, size = 0x4000000, 0x12345
    entries = e820_map(ram, host_bridge, (start, size))
    ram_ranges = [(e.addr, e.addr + e.size) for e in entries if e.type == E820_RAM]
    assert (layout.KERNEL_MIN_GPA, start) in ram_ranges and (start + 0x13000, ram) in ram_ranges
    reserved = [(e.addr, e.size) for e in entries if e.type == E820_RESERVED]
    assert (start, 0x13000) in reserved  # page-rounded
    assert e820_map(ram, host_bridge)[3].size == ram - layout.KERNEL_MIN_GPA
