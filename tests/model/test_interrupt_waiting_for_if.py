"""An interrupt from the in-kernel source that waits for RFLAGS.IF: the boundary hook stays armed
at every block while IF is clear (boundary_hook.py's `unchanged`), and still sees STI, a kick and a
memslot change."""

from __future__ import annotations

import struct

from pcihole.host.mman import HostMapping
from pcihole.hv import exits

from .system_guest import PAGE_TABLES, RAM_BYTES
from .test_halt_with_interrupt_source import Guest, address_of, fire_and_notify, port_out

LOOP = "mov $20000, %ecx\n 1: dec %ecx\n jnz 1b\n"


def test_waiting_interrupt_is_taken_after_the_instruction_after_sti(model_hv):
    """20,000 blocks with IF clear and the interrupt waiting, then STI: taken after STI's shadow
    (the NOP), before the OUT, once."""
    body = f"cli\n out %al, $0x81\n {LOOP} sti\n nop\n out %al, $0x80"
    guest = Guest(model_hv, body)
    try:
        assert port_out(guest.vcpu.run()) == 0x81
        fire_and_notify(guest)
        assert port_out(guest.vcpu.run()) == 0x80
        assert guest.handled() == (address_of(body, "out %al, $0x80"), 1)
    finally:
        guest.close()


def test_kick_while_an_interrupt_waits_for_if(model_hv):
    """A guest spinning with IF clear and an interrupt waiting: a kick still returns Interrupted,
    and the interrupt stays pending."""
    guest = Guest(model_hv, "cli\n out %al, $0x81\n 1: jmp 1b")
    try:
        assert port_out(guest.vcpu.run()) == 0x81
        fire_and_notify(guest)
        guest.later(guest.vcpu.kick)
        assert guest.vcpu.run() == exits.Interrupted()
        assert guest.handled() == (0, 0) and guest.source.has_interrupt()
    finally:
        guest.close()


def test_memslot_change_while_an_interrupt_waits_for_if(model_hv):
    """A slot added from another thread while the guest spins with IF clear and an interrupt
    waiting: the guest sees it (the loop polls a byte of the new slot) and goes on."""
    slot_gpa = RAM_BYTES  # just above the guest's RAM slot
    body = f"cli\n out %al, $0x81\n 1: cmpb $0x5a, {slot_gpa}\n jne 1b\n out %al, $0x80"
    guest = Guest(model_hv, body)
    extra = HostMapping.anonymous(0x1000)
    try:
        extra.write(0, b"\x5a")
        guest.ram.write(PAGE_TABLES + 0x3000 + (slot_gpa >> 12) * 8, struct.pack("<Q", slot_gpa | 3))
        assert port_out(guest.vcpu.run()) == 0x81
        fire_and_notify(guest)
        guest.later(lambda: guest.vm.set_user_memory_region(1, 0, slot_gpa, 0x1000, extra.addr))
        exit_ = guest.vcpu.run()
        while isinstance(exit_, exits.MmioRead):  # reads of the hole before the slot exists
            guest.vcpu.complete_read(bytes(exit_.size))
            exit_ = guest.vcpu.run()
        assert port_out(exit_) == 0x80, exit_
        assert guest.handled() == (0, 0) and guest.source.has_interrupt()
    finally:
        guest.close()
        extra.close()
