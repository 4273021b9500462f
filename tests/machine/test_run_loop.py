"""The run loop on /dev/kvm with tiny guests: serial output, debug-exit, timeout, triple fault."""

from __future__ import annotations

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import x86_cpu_state
from pcihole.machine.bus import Bus
from pcihole.machine.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from pcihole.machine.dispatch import ExitHandler, StopReason
from pcihole.machine.run_loop import run_until_stop
from pcihole.machine.serial import COM1_BASE, UART_REGISTERS, SerialConsole
from pcihole.machine.stats import RunStats
from tests.guestasm import assemble

pytestmark = pytest.mark.kvm


def boot(vm, source):
    ram = HostMapping.anonymous(1 << 20)
    ram.write(0x1000, assemble(source, org=0x1000))
    vm.set_user_memory_region(0, 0, 0, ram.size, ram.addr)
    vcpu = vm.create_vcpu(0)
    x86_cpu_state.enter_protected_mode_flat(vcpu, 0x1000, esp=0x8000)
    pio, stats = Bus("pio"), RunStats()
    serial = SerialConsole()
    pio.insert(serial, COM1_BASE, UART_REGISTERS, "COM1")
    pio.insert(DebugExit(), DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, "debug-exit")
    return ram, vcpu, ExitHandler(Bus("mmio"), pio, stats), serial, stats


def test_serial_then_debug_exit(kvm_vm):
    ram, vcpu, handler, serial, stats = boot(
        kvm_vm,
        """
        mov $0x3f8, %dx
        mov $'h', %al
        out %al, %dx
        mov $'i', %al
        out %al, %dx
        mov $0xf4, %dx
        mov $3, %al
        out %al, %dx
        hlt
        """,
    )
    stop = run_until_stop(vcpu, handler, timeout=30)
    assert (stop.reason, stop.status) == (StopReason.DEBUG_EXIT, 3)
    assert serial.text() == "hi"
    assert stats.exits.io == 3
    ram.close()


def test_a_runaway_guest_is_stopped_after_the_timeout(kvm_vm):
    ram, vcpu, handler, _serial, _stats = boot(kvm_vm, "1: jmp 1b")
    stop = run_until_stop(vcpu, handler, timeout=0.3)
    assert stop.reason == StopReason.TIMEOUT and "0.3 s" in stop.detail
    ram.close()


def test_triple_fault_is_reported(kvm_vm):
    ram, vcpu, handler, _serial, _stats = boot(kvm_vm, "ud2")
    assert run_until_stop(vcpu, handler, timeout=30).reason == StopReason.TRIPLE_FAULT
    ram.close()
