"""A guest that starts in 32-bit protected mode (the PVH entry state) and enters long mode itself,
as Linux's pvh_start_xen does: PAE, EFER.LME by WRMSR, CR3, CR0.PG, a far jump to a 64-bit CS.

The model builds a UC_MODE_32 engine for that start state; after the switch its API reads 64-bit
registers as 0 (cpu.live_mode). The VMM must still see and set all 64 bits, at the first exit
after the switch (still in the 32-bit engine) and after the model moved the state into a 64-bit
engine, and an exception raised first thing in long mode must go through the 64-bit IDT.
"""

from __future__ import annotations

import struct

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from pcihole.hv.x86_cpu_state import enter_protected_mode_flat
from pcihole.machine.host_quirks import host_is_pvm
from tests.guestasm import assemble

from .system_guest import (
    CODE,
    GDT,
    HANDLERS,
    IDT,
    KERNEL_CS,
    KERNEL_DS,
    PAGE_TABLES,
    RAM_BYTES,
    RESULTS,
    STACK,
    Handler,
    gdt,
    idt,
    page_tables,
)

VALUES = {
    "rax": 0x1111222233334444,
    "rbx": 0x5555666677778888,
    "rcx": 0x99990000AAAABBBB,
    "rdx": 0xCCCCDDDDEEEEFFFF,
    "rsi": 0x0123456789ABCDEF,
    "rdi": 0xFEDCBA9876543210,
    "rbp": 0x8000000000000001,
    **{f"r{i}": 0x1000000000000000 * (i - 7) + i for i in range(8, 16)},
}
WRITTEN_R9 = 0xDEADBEEFCAFEF00D
HANDLER_RBX = 0xFEEDFACE12345678
EFER_LME = 8
EFER_LME_BIT, EFER_LMA_BIT = 1 << 8, 1 << 10
CR4_PAE = 0x20
UD = 6


def _record_frame() -> str:
    """The #UD handler: RSP and the 5-quadword frame at RESULTS + 8, RBX set, then HLT."""
    lines = [f"    mov %rsp, {RESULTS + 8}"]
    for i in range(5):
        lines += [f"    mov {8 * i}(%rsp), %rax", f"    mov %rax, {RESULTS + 16 + 8 * i}"]
    return "\n".join([*lines, f"    movabs ${HANDLER_RBX:#x}, %rbx", "    hlt"])


def _source(exit_first: bool) -> str:
    sets = "\n".join(f"    movabs ${v:#x}, %{name}" for name, v in VALUES.items())
    first = f"    out %al, $0x80\n    mov %r9, {RESULTS}\n" if exit_first else ""
    return f"""
.code32
    lgdt gdtr32
    mov %cr4, %eax
    or ${CR4_PAE}, %eax
    mov %eax, %cr4
    mov ${PAGE_TABLES}, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    bts ${EFER_LME}, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    ljmp ${KERNEL_CS}, $long64
.code64
long64:
    mov ${KERNEL_DS}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lidt idtr64(%rip)
{sets}
{first}
    ud2
    hlt
.org {HANDLERS - CODE:#x}
{_record_frame()}
gdtr32: .word {len(gdt()) - 1}
        .long {GDT}
idtr64: .word {256 * 16 - 1}
        .quad {IDT}
"""


def _image(exit_first: bool) -> bytes:
    return assemble(_source(exit_first), bits=64, org=CODE)


def _address_of(exit_first: bool, instruction: str) -> int:
    image, encoded = _image(exit_first), assemble(instruction, bits=64)
    assert image.count(encoded) == 1
    return CODE + image.index(encoded)


def run_switch_guest(hv, *, exit_first: bool):
    """Run the guest to its HLT: (exits, registers at the OUT exit, final registers, results)."""
    vm = hv.create_vm()
    ram = HostMapping.anonymous(RAM_BYTES, name="guest ram")
    try:
        ram.write(CODE, _image(exit_first))
        ram.write(GDT, gdt())
        ram.write(IDT, idt([Handler(UD, "")]))
        ram.write(PAGE_TABLES, page_tables())
        vm.set_user_memory_region(0, 0, 0, RAM_BYTES, ram.addr)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(hv.get_supported_cpuid())  # EFER.LME needs CPUID long mode (__kvm_valid_efer)
        enter_protected_mode_flat(vcpu, CODE, esp=STACK)
        seen, at_exit = [], None
        for _ in range(5):
            exit_ = vcpu.run()
            seen.append(exit_)
            if isinstance(exit_, exits.IoOut):
                regs = vcpu.get_regs()
                at_exit = {name: getattr(regs, name) for name in (*VALUES, "rip", "rsp")}
                regs.r9 = WRITTEN_R9
                # RIP is still on the OUT at the exit (KVM's complete_fast_pio_out skips it on the
                # next entry unless userspace moved RIP): move it past the OUT, which both do alike.
                regs.rip += 2
                vcpu.set_regs(regs)
                continue
            break
        regs = vcpu.get_regs()
        final = {name: getattr(regs, name) for name in (*VALUES, "rip", "rsp")}
        results = ram.read(RESULTS, 7 * 8)
        sregs = vcpu.get_sregs()
        final["sregs"] = {
            "cs": (sregs.cs.selector, sregs.cs.l, sregs.cs.db),
            "ss": sregs.ss.selector,
            "efer": sregs.efer & (EFER_LME_BIT | EFER_LMA_BIT),
            "cr0.pg": bool(sregs.cr0 & 0x80000000),
            "cr4.pae": bool(sregs.cr4 & CR4_PAE),
            "cr3": sregs.cr3,
            "gdt": (sregs.gdt.base, sregs.gdt.limit),
            "idt": (sregs.idt.base, sregs.idt.limit),
        }
        vcpu.close()
        return seen, at_exit, final, results
    finally:
        vm.close()
        ram.close()


def expected(exit_first: bool) -> tuple[list, dict | None, dict, bytes]:
    """What the SDM says the guest leaves (the same on any CPU that runs it)."""
    ud2 = _address_of(exit_first, "ud2")
    hlt_in_handler = HANDLERS + len(assemble(_record_frame(), bits=64))
    # RFLAGS: the fixed bit, SF and PF from the `or` that set CR0.PG (its low byte 0x11 has even
    # parity), RF as the CPU sets it in a fault's image (SDM Vol. 3B 17.3.1.1); IF clear.
    rflags = 0x2 | 0x80 | 0x4 | 0x10000
    frame = (ud2, KERNEL_CS, rflags, STACK, KERNEL_DS)  # RIP, CS, RFLAGS, RSP, SS
    results = struct.pack("<QQ5Q", WRITTEN_R9 if exit_first else 0, STACK - 40, *frame)
    final_values = {**VALUES, "rax": KERNEL_DS, "rbx": HANDLER_RBX}
    if exit_first:
        final_values["r9"] = WRITTEN_R9
    final = {**final_values, "rip": hlt_in_handler, "rsp": STACK - 40}
    final["sregs"] = {  # KVM_GET_SREGS: what the guest loaded, not the 32-bit start state
        "cs": (KERNEL_CS, 1, 0),
        "ss": KERNEL_DS,
        "efer": EFER_LME_BIT | EFER_LMA_BIT,
        "cr0.pg": True,
        "cr4.pae": True,
        "cr3": PAGE_TABLES,
        "gdt": (GDT, len(gdt()) - 1),
        "idt": (IDT, 256 * 16 - 1),
    }
    if not exit_first:
        return [exits.Hlt()], None, final, results
    out = _address_of(True, "out %al, $0x80")
    at_exit = {**VALUES, "rip": out, "rsp": STACK}
    return [exits.IoOut(0x80, 1, bytes([VALUES["rax"] & 0xFF])), exits.Hlt()], at_exit, final, results


@pytest.mark.parametrize("exit_first", [True, False], ids=["exit-first", "exception-first"])
def test_model_follows_the_guest_into_long_mode(model_hv, exit_first):
    seen, at_exit, final, results = run_switch_guest(model_hv, exit_first=exit_first)
    want_exits, want_at_exit, want_final, want_results = expected(exit_first)
    assert seen == want_exits
    assert at_exit == want_at_exit
    assert final == want_final
    assert results == want_results


@pytest.mark.kvm
@pytest.mark.parametrize("exit_first", [True, False], ids=["exit-first", "exception-first"])
def test_long_mode_switch_matches_kvm(kvm_hv, model_hv, exit_first):
    kvm = run_switch_guest(kvm_hv, exit_first=exit_first)
    if any(isinstance(e, exits.InternalError | exits.Shutdown) for e in kvm[0]) and host_is_pvm():
        pytest.skip(f"this host's KVM cannot run the switch (WRMSR of EFER in kernel mode on PVM): {kvm[0]}")
    assert run_switch_guest(model_hv, exit_first=exit_first) == kvm
