"""A 64-bit guest with a GDT, an IDT, a TSS, user pages and its handlers, run the same way on any backend.

The VMM starts the vCPU in long mode (x86_cpu_state.enter_long_mode) with its own page tables and
writes the descriptor tables into guest RAM; the guest itself loads them (lgdt, lidt, ltr) and
reloads every segment register, so the CPU's hidden state comes from the guest's tables on both
backends (the model takes nothing but the mode from KVM_SET_SREGS).

Memory (1 MiB of RAM, identity-mapped through one 4 KiB page table, every page user-accessible):
  0x1000  the guest: `body` at _start, then the handlers, handler i at HANDLERS + i * HANDLER_BYTES
  0x5000  a page that is not present;  0x6000 a read-only page
  0x7000  RESULTS, where handlers and the body store what they saw (compared between backends)
  0x8000  GDT; 0x8800 TSS; 0x9000 IDT (256 gates); 0xa000.. the page tables
  stacks: the body's at 0x20000, RSP0 0x30000, IST1 0x38000, ring 3's at 0x40000
Selectors: 0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user code, 0x28 TSS (STAR
uses 0x08 for SYSCALL and 0x10 for SYSRET, so SYSRET lands on 0x1b / 0x23, as Linux's layout).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from pcihole.hv.x86_cpu_state import enter_long_mode, enter_protected_mode_flat
from tests.guestasm import assemble

RAM_BYTES = 0x100000
CODE = 0x1000
HANDLERS = CODE + 0x1000
HANDLER_BYTES = 0x80
ABSENT_PAGE = 0x5000
READONLY_PAGE = 0x6000
RESULTS = 0x7000
GDT = 0x8000
TSS = 0x8800
IDT = 0x9000
PAGE_TABLES = 0xA000
STACK, RSP0, IST1, USER_STACK = 0x20000, 0x30000, 0x38000, 0x40000
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS, TSS_SEL = 0x08, 0x10, 0x18, 0x20, 0x28

INTERRUPT_GATE, TRAP_GATE = 0xE, 0xF

# The guest's first instructions: load the tables, reload every segment, then run the body.
PROLOGUE = f"""
    lgdt gdtr(%rip)
    lidt idtr(%rip)
    mov ${TSS_SEL}, %ax
    ltr %ax
    mov ${KERNEL_DS}, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    pushq ${KERNEL_CS}
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:
"""


@dataclass
class Handler:
    vector: int
    source: str
    gate: int = INTERRUPT_GATE
    dpl: int = 0
    ist: int = 0
    present: bool = True


@dataclass
class SystemRun:
    exits: list = field(default_factory=list)
    regs: dict = field(default_factory=dict)
    results: bytes = b""
    code_at_rip: bytes = b""  # the two bytes at the final RIP (identity-mapped RAM)


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    low = (limit & 0xFFFF) | (base & 0xFFFF) << 16
    high = (base >> 16) & 0xFF | access << 8 | ((limit >> 16) & 0xF) << 16 | flags << 20 | (base >> 24) << 24
    return struct.pack("<II", low, high)


def gdt() -> bytes:
    tss_low = _descriptor(TSS, 0x67, 0x89, 0)  # available 64-bit TSS, present, DPL 0
    return b"".join(
        [
            bytes(8),
            _descriptor(0, 0xFFFFF, 0x9A, 0xA),  # kernel code: P, S, exec/read; G, L
            _descriptor(0, 0xFFFFF, 0x92, 0xC),  # kernel data: P, S, read/write; G, B
            _descriptor(0, 0xFFFFF, 0xF2, 0xC),  # user data, DPL 3
            _descriptor(0, 0xFFFFF, 0xFA, 0xA),  # user code, DPL 3, L
            tss_low,
            struct.pack("<II", TSS >> 32, 0),
        ]
    )


def tss() -> bytes:
    out = bytearray(0x68)
    struct.pack_into("<Q", out, 4, RSP0)
    struct.pack_into("<Q", out, 0x24, IST1)
    struct.pack_into("<H", out, 0x66, 0x68)  # I/O map base: none
    return bytes(out)


def idt(handlers: list[Handler]) -> bytes:
    out = bytearray(256 * 16)
    for i, h in enumerate(handlers):
        addr = HANDLERS + i * HANDLER_BYTES
        low = (addr & 0xFFFF) | KERNEL_CS << 16
        high = (addr & 0xFFFF0000) | h.present << 15 | h.dpl << 13 | h.gate << 8 | h.ist
        struct.pack_into("<IIII", out, h.vector * 16, low, high, addr >> 32, 0)
    return bytes(out)


def page_tables() -> bytes:
    """PML4 -> PDPT -> PD -> one page table over the first 2 MiB: user, writable, present 4 KiB pages."""
    pml4, pdpt, pd = (bytearray(0x1000) for _ in range(3))
    struct.pack_into("<Q", pml4, 0, PAGE_TABLES + 0x1000 | 7)
    struct.pack_into("<Q", pdpt, 0, PAGE_TABLES + 0x2000 | 7)
    struct.pack_into("<Q", pd, 0, PAGE_TABLES + 0x3000 | 7)
    pt = bytearray(0x1000)
    for page in range(RAM_BYTES >> 12):
        flags = 7
        if page << 12 == ABSENT_PAGE:
            flags = 0
        elif page << 12 == READONLY_PAGE:
            flags = 5
        struct.pack_into("<Q", pt, page * 8, page << 12 | flags)
    return bytes(pml4 + pdpt + pd + pt)


def _source_with_handlers(prologue: str, body: str, handlers: list[Handler], tables: str) -> str:
    """prologue, body, HLT; each handler at its slot; then the GDTR / IDTR operands (`tables`)."""
    parts = [prologue, body, "\n    hlt\n"]
    for i, h in enumerate(handlers):
        parts.append(f"\n.org {HANDLERS - CODE + i * HANDLER_BYTES:#x}\n{h.source}\n")
    parts.append(f"\n.org {HANDLERS - CODE + len(handlers) * HANDLER_BYTES:#x}\n{tables}")
    return "".join(parts)


def guest_source(body: str, handlers: list[Handler]) -> str:
    tables = f"""gdtr: .word {len(gdt()) - 1}
      .quad {GDT}
idtr: .word {256 * 16 - 1}
      .quad {IDT}
"""
    return _source_with_handlers(PROLOGUE, body, handlers, tables)


REG_NAMES = (
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rsp",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "rip",
    "rflags",
)


def run_system_guest(
    hv,
    body: str,
    handlers: list[Handler],
    *,
    on_exit=None,
    max_exits: int = 20,
    rflags: int = 0x2,
    setup=None,
) -> SystemRun:
    """Run the guest to its first HLT or Shutdown; `on_exit(vcpu, exit_, index)` may act on each
    exit (inject an interrupt) and returns True to run on even after an HLT; `setup(vcpu)` runs
    on the new vCPU before its registers are set (as configure_vcpu does: CPUID, MSRs)."""
    vm = hv.create_vm()
    ram = HostMapping.anonymous(RAM_BYTES, name="guest ram")
    try:
        ram.write(CODE, assemble(guest_source(body, handlers), bits=64, org=CODE))
        ram.write(GDT, gdt())
        ram.write(TSS, tss())
        ram.write(IDT, idt(handlers))
        vm.set_user_memory_region(0, 0, 0, RAM_BYTES, ram.addr)
        vcpu = vm.create_vcpu(0)
        if setup is not None:
            setup(vcpu)
        enter_long_mode(vcpu, CODE, page_tables_gpa=PAGE_TABLES + 0x10000, write_guest=ram.write, rsp=STACK)
        ram.write(PAGE_TABLES, page_tables())
        sregs = vcpu.get_sregs()
        sregs.cr3 = PAGE_TABLES
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rflags = rflags  # IF from the start: this host's KVM cannot emulate STI in kernel mode
        vcpu.set_regs(regs)
        return run_until_halt(vcpu, ram, max_exits=max_exits, on_exit=on_exit)
    finally:
        vm.close()
        ram.close()


def run_until_halt(vcpu, ram, *, max_exits: int, on_exit=None) -> SystemRun:
    """Run `vcpu` to its first HLT, Shutdown or internal error (or `max_exits`), then close it and
    say what the guest left: registers, the results area, the bytes at RIP."""
    run = SystemRun()
    for i in range(max_exits):
        exit_ = vcpu.run()
        run.exits.append(exit_)
        if on_exit is not None and on_exit(vcpu, exit_, i):
            continue  # the test acted on this exit (injected an interrupt): run on
        if isinstance(exit_, exits.Hlt | exits.Shutdown | exits.InternalError):
            break
        if isinstance(exit_, exits.IoIn):
            vcpu.complete_read(bytes(exit_.size * exit_.count))
    regs = vcpu.get_regs()
    run.regs = {name: getattr(regs, name) for name in REG_NAMES}
    run.results = ram.read(RESULTS, 0x100)
    if regs.rip < RAM_BYTES - 2:
        run.code_at_rip = ram.read(regs.rip, 2)
    vcpu.close()
    return run


def _address_in(source: str, instruction: str, bits: int) -> int:
    """The guest-physical address of `instruction` (its only occurrence) in the guest `source`."""
    image = assemble(source, bits=bits, org=CODE)
    encoded = assemble(instruction, bits=bits)
    assert image.count(encoded) == 1, f"{instruction!r} is not once in the guest"
    return CODE + image.index(encoded)


def address_of(body: str, instruction: str) -> int:
    """The address of `instruction` in the 64-bit guest built from `body`."""
    return _address_in(guest_source(body, []), instruction, 64)


# --- the same in 32-bit protected mode (paging off, as the model runs it) -----------------------

PROTECTED_PROLOGUE = f"""
    lgdt gdtr
    lidt idtr
    mov ${TSS_SEL}, %ax
    ltr %ax
    mov ${KERNEL_DS}, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    ljmp ${KERNEL_CS}, $1f
1:
"""


def gdt32() -> bytes:
    return b"".join(
        [
            bytes(8),
            _descriptor(0, 0xFFFFF, 0x9A, 0xC),  # kernel code: 32-bit (D), G
            _descriptor(0, 0xFFFFF, 0x92, 0xC),  # kernel data
            _descriptor(0, 0xFFFFF, 0xF2, 0xC),  # user data, DPL 3
            _descriptor(0, 0xFFFFF, 0xFA, 0xC),  # user code, DPL 3
            _descriptor(TSS, 0x67, 0x89, 0),  # available 32-bit TSS
        ]
    )


def tss32() -> bytes:
    out = bytearray(0x68)
    struct.pack_into("<IH", out, 4, RSP0, KERNEL_DS)  # ESP0, SS0
    struct.pack_into("<H", out, 0x66, 0x68)
    return bytes(out)


def idt32(handlers: list[Handler]) -> bytes:
    out = bytearray(256 * 8)
    for i, h in enumerate(handlers):
        addr = HANDLERS + i * HANDLER_BYTES
        low = (addr & 0xFFFF) | KERNEL_CS << 16
        high = (addr & 0xFFFF0000) | h.present << 15 | h.dpl << 13 | h.gate << 8
        struct.pack_into("<II", out, h.vector * 8, low, high)
    return bytes(out)


def protected_guest_source(body: str, handlers: list[Handler]) -> str:
    tables = f"""gdtr: .word {len(gdt32()) - 1}
      .long {GDT}
idtr: .word {256 * 8 - 1}
      .long {IDT}
"""
    return _source_with_handlers(PROTECTED_PROLOGUE, body, handlers, tables)


def run_protected_guest(
    hv, body: str, handlers: list[Handler], *, max_exits: int = 20, setup=None
) -> SystemRun:
    """The 32-bit guest, from the PVH entry state, to its first HLT or Shutdown (`setup(vcpu)` as
    for run_system_guest)."""
    vm = hv.create_vm()
    ram = HostMapping.anonymous(RAM_BYTES, name="guest ram")
    try:
        ram.write(CODE, assemble(protected_guest_source(body, handlers), bits=32, org=CODE))
        ram.write(GDT, gdt32())
        ram.write(TSS, tss32())
        ram.write(IDT, idt32(handlers))
        vm.set_user_memory_region(0, 0, 0, RAM_BYTES, ram.addr)
        vcpu = vm.create_vcpu(0)
        if setup is not None:
            setup(vcpu)
        enter_protected_mode_flat(vcpu, CODE, esp=STACK)
        return run_until_halt(vcpu, ram, max_exits=max_exits)
    finally:
        vm.close()
        ram.close()


def protected_address_of(body: str, instruction: str) -> int:
    """The address of `instruction` in the 32-bit guest built from `body`."""
    return _address_in(protected_guest_source(body, []), instruction, 32)
