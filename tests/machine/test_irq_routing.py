"""The machine's GSI routing, seen by a guest on both backends: the PIT raises GSI 0, which the
builder's PC routing (machine/irq_routing.py) sends to IOAPIC pin 2, as the MADT says."""

from __future__ import annotations

import pytest

from pcihole.machine.builder import build_machine
from pcihole.machine.dispatch import StopReason
from pcihole.machine.machinefile import loads
from tests.backends import BACKENDS
from tests.guest_runner import pvh_kernel_from_asm

LAPIC, IOAPIC = 0xFEE00000, 0xFEC00000
IRR_96_127 = LAPIC + 0x230  # IRR bits of vectors 0x60-0x7f


def redirect(pin: int, vector: int) -> str:
    """IOAPIC redirection entry `pin`: fixed delivery of `vector` to APIC 0, edge, unmasked."""
    return (
        f"movl ${0x11 + 2 * pin}, {IOAPIC:#x}\nmovl $0, {IOAPIC + 0x10:#x}\n"
        f"movl ${0x10 + 2 * pin}, {IOAPIC:#x}\nmovl ${vector}, {IOAPIC + 0x10:#x}\n"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_pit_reaches_ioapic_pin_2_in_a_built_machine(backend):
    """With interrupts off the vector waits in the LAPIC's IRR: the guest reports which of entry
    0's vector (0x60, bit 0) and entry 2's (0x62, bit 2) arrived once the PIT has fired."""
    code = pvh_kernel_from_asm(
        f"""
    cli
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    movl $0x1ff, {LAPIC + 0xF0:#x}
    {redirect(0, 0x60)}
    {redirect(2, 0x62)}
    mov $0x34, %al
    out %al, $0x43
    mov $0xa9, %al
    out %al, $0x40
    mov $0x04, %al
    out %al, $0x40
1:  pause
    mov {IRR_96_127:#x}, %eax
    and $5, %eax
    jz 1b
    mov $20000, %ecx
2:  pause
    loop 2b
    mov {IRR_96_127:#x}, %eax
    and $5, %eax
    out %al, $0xf4
    hlt
"""
    )
    spec = loads("[machine]\nram_mib = 64\n[[segment]]\nid = 0\necam_base = 0xe0000000\n", "<irq.toml>")
    with build_machine(spec, backend=backend, strategy="auto", kernel=code, kernel_name="k") as m:
        result = m.run(timeout=60)
    assert result.stop.reason == StopReason.DEBUG_EXIT
    assert result.stop.status == 0x04  # entry 2's vector only
