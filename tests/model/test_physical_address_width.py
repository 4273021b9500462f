"""The model's physical address width is what its CPU really enforces, not only what CPUID says.

KVM's CPUID 0x80000008 EAX[7:0] is the host's MAXPHYADDR, and a guest PTE with an address bit at or
above it is a reserved-bit #PF (SDM Vol. 3A 4.5.4: "a reserved bit ... set to 1": bits
M-51 where M is MAXPHYADDR; error code bit 3, RSVD). Unicorn 2.1.4 builds its page walk
(target/i386/excp_helper.c handle_mmu_fault, rsvd_mask = PG_HI_RSVD_MASK) with the compile-time
TCG_PHYS_ADDR_BITS (40), whatever X86CPU.phys_bits says: raising only the CPUID value (as Linux
would want for a window above 1 TiB) would tell the guest a width its page walks refuse. This
test ties the two together, so that a change of either without the other fails here.
"""

from __future__ import annotations

import struct

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, Uc
from unicorn import x86_const as x86

from pcihole.hv.model.cpu import ENGINE_CPU_MODEL
from pcihole.hv.model.cpuid import supported_entries
from pcihole.hv.model.engine_state import EngineState

PF = 14
PF_RSVD = 1 << 3
PRESENT_WRITABLE = 3
PML4, PDPT, PD, PT_LOW, PT_HIGH = 0x10000, 0x11000, 0x12000, 0x13000, 0x14000
CODE = 0x1000
TARGET = 0x200000  # the virtual page the last PTE maps
CR0_PE_PG = 0x80000001
CR4_PAE = 0x20


def claimed_width() -> int:
    entry = next(e for e in supported_entries() if e.function == 0x80000008)
    return entry.eax & 0xFF


def load_through_pte(physical: int) -> tuple[int | None, int, int]:
    """Run `mov rax, [TARGET]` on an engine of the model's CPU model, 4-level paging, TARGET's
    PTE pointing at `physical` (mapped, holding a marker): (exception, error code, rax)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(ENGINE_CPU_MODEL)
    state = EngineState(uc, long_mode=True)
    assert state.layout_ok()
    uc.mem_map(0, 0x100000)
    uc.mem_map(physical, 0x1000)
    uc.mem_write(physical, struct.pack("<Q", 0xFEEDFACE))

    def entry(table: int, index: int, value: int) -> None:
        uc.mem_write(table + 8 * index, struct.pack("<Q", value | PRESENT_WRITABLE))

    entry(PML4, 0, PDPT)
    entry(PDPT, 0, PD)
    entry(PD, 0, PT_LOW)
    entry(PD, 1, PT_HIGH)  # TARGET's 2 MiB
    for i in range(256):  # the first MiB, identity (code and tables)
        entry(PT_LOW, i, i << 12)
    entry(PT_HIGH, 0, physical)
    uc.mem_write(CODE, b"\x48\x8b\x04\x25" + struct.pack("<I", TARGET))  # mov rax, [TARGET]
    uc.reg_write(x86.UC_X86_REG_CR3, PML4)
    uc.reg_write(x86.UC_X86_REG_CR4, uc.reg_read(x86.UC_X86_REG_CR4) | CR4_PAE)
    uc.reg_write(x86.UC_X86_REG_CR0, uc.reg_read(x86.UC_X86_REG_CR0) | CR0_PE_PG)
    raised: list[int] = []

    def on_interrupt(u: Uc, number: int, _data: object) -> None:
        raised.append(number)
        u.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_interrupt)
    uc.emu_start(CODE, CODE + 8)
    state.load()
    return (raised[0] if raised else None), state.error_code, uc.reg_read(x86.UC_X86_REG_RAX)


def test_the_highest_page_below_the_claimed_width_is_reachable():
    width = claimed_width()
    exception, _, rax = load_through_pte((1 << width) - 0x1000)
    assert exception is None
    assert rax == 0xFEEDFACE


def test_a_pte_at_the_claimed_width_is_a_reserved_bit_page_fault():
    width = claimed_width()
    assert width < 52  # a bit at the width must exist in a PTE's address field
    exception, error_code, rax = load_through_pte(1 << width)
    assert exception == PF
    assert error_code & PF_RSVD
    assert rax != 0xFEEDFACE
