"""HLT with an in-kernel interrupt source (the future local APIC): the vCPU sleeps in run() until
the source has an interrupt the guest can take, as KVM's kvm_vcpu_halt does; kick and close wake it."""

from __future__ import annotations

import errno
import struct
import threading

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from pcihole.hv.x86_cpu_state import enter_long_mode
from tests.guestasm import assemble

from .system_guest import (
    CODE,
    GDT,
    IDT,
    PAGE_TABLES,
    RAM_BYTES,
    RESULTS,
    STACK,
    TSS,
    Handler,
    address_of,
    gdt,
    guest_source,
    idt,
    page_tables,
    tss,
)

VECTOR = 0x30


class OneVector:
    """An interrupt source holding at most one pending vector (what an APIC's IRR would)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vector: int | None = None

    def fire(self, vector: int) -> None:
        with self._lock:
            self._vector = vector

    def has_interrupt(self) -> bool:
        with self._lock:
            return self._vector is not None

    def acknowledge(self) -> int:
        with self._lock:
            vector, self._vector = self._vector, None
        assert vector is not None
        return vector


HANDLER = Handler(VECTOR, f"mov (%rsp), %rax\n mov %rax, {RESULTS}\n incq {RESULTS + 8}\n iretq")


class Guest:
    """The system guest of system_guest.py with a source attached, run step by step."""

    def __init__(self, hv, body: str) -> None:
        self.body = body
        self.vm = hv.create_vm()
        self.ram = HostMapping.anonymous(RAM_BYTES, name="guest ram")
        self.ram.write(CODE, assemble(guest_source(body, [HANDLER]), bits=64, org=CODE))
        self.ram.write(GDT, gdt())
        self.ram.write(TSS, tss())
        self.ram.write(IDT, idt([HANDLER]))
        self.vm.set_user_memory_region(0, 0, 0, RAM_BYTES, self.ram.addr)
        self.vcpu = self.vm.create_vcpu(0)
        enter_long_mode(
            self.vcpu, CODE, page_tables_gpa=PAGE_TABLES + 0x10000, write_guest=self.ram.write, rsp=STACK
        )
        self.ram.write(PAGE_TABLES, page_tables())
        sregs = self.vcpu.get_sregs()
        sregs.cr3 = PAGE_TABLES
        self.vcpu.set_sregs(sregs)
        self.source = OneVector()
        self.vcpu.attach_interrupt_source(self.source)

    def later(self, action) -> threading.Timer:
        """Run `action` from another thread while run() sleeps (the delay only lets it fall asleep)."""
        timer = threading.Timer(0.05, action)
        timer.start()
        return timer

    def handled(self) -> tuple[int, int]:
        """(the RIP the last interrupt frame held, how many interrupts the handler took)."""
        return struct.unpack_from("<QQ", self.ram.read(RESULTS, 16))

    def close(self) -> None:
        self.vm.close()
        self.ram.close()


def port_out(exit_) -> int | None:
    return exit_.port if isinstance(exit_, exits.IoOut) else None


def fire_and_notify(guest: Guest) -> None:
    guest.source.fire(VECTOR)
    guest.vcpu.interrupt_pending()


def test_hlt_sleeps_until_the_source_fires(model_hv):
    guest = Guest(model_hv, "sti\n hlt\n out %al, $0x80")
    try:
        guest.later(lambda: fire_and_notify(guest))
        assert port_out(guest.vcpu.run()) == 0x80  # no Hlt exit
        assert guest.handled() == (address_of(guest.body, "out %al, $0x80"), 1)
    finally:
        guest.close()


def test_kick_wakes_hlt_and_the_vcpu_stays_halted(model_hv):
    guest = Guest(model_hv, "sti\n hlt\n out %al, $0x80")
    try:
        guest.later(guest.vcpu.kick).join()
        assert guest.vcpu.run() == exits.Interrupted()
        assert guest.handled() == (0, 0)
        guest.later(lambda: fire_and_notify(guest))
        assert port_out(guest.vcpu.run()) == 0x80  # halted until then
        assert guest.handled() == (address_of(guest.body, "out %al, $0x80"), 1)
    finally:
        guest.close()


def test_hlt_with_if_clear_is_not_woken_by_the_source(model_hv):
    """kvm_arch_interrupt_allowed: with IF clear a pending interrupt does not end the halt."""
    guest = Guest(model_hv, "cli\n hlt\n out %al, $0x80")
    try:
        fire_and_notify(guest)
        guest.later(guest.vcpu.kick)
        assert guest.vcpu.run() == exits.Interrupted()
        assert guest.handled() == (0, 0) and guest.source.has_interrupt()
    finally:
        guest.close()


def test_source_interrupt_taken_at_the_next_block_while_running(model_hv):
    """A source that fires during an exit: taken at the next instruction boundary the model can
    stop at, the start of the next translation block (here the JMP's target)."""
    guest = Guest(model_hv, "out %al, $0x81\n mov $1, %ebx\n jmp 1f\n1: out %al, $0x80")
    try:
        regs = guest.vcpu.get_regs()
        regs.rflags = 0x202
        guest.vcpu.set_regs(regs)
        assert port_out(guest.vcpu.run()) == 0x81
        fire_and_notify(guest)
        assert port_out(guest.vcpu.run()) == 0x80
        assert guest.handled() == (address_of(guest.body, "out %al, $0x80"), 1)
    finally:
        guest.close()


def test_close_from_another_thread_wakes_hlt(model_hv):
    guest = Guest(model_hv, "sti\n hlt")
    try:
        guest.later(guest.vcpu.close)
        with pytest.raises(OSError) as closed:
            guest.vcpu.run()  # returns only because close() woke the halted vCPU
        assert closed.value.errno == errno.EBADF
    finally:
        guest.close()
