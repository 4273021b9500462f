"""instruction_length.py, the length half of KVM's x86_decode_insn, against GNU as: each instruction
below is assembled alone, and the decoder must find the length `as` produced (with a NOP after it,
so a decoder that reads too little or too far is caught either way)."""

from __future__ import annotations

import re

import pytest

from pcihole.hv.model.instruction_length import decode, step_string, write_exit
from pcihole.hv.uapi import kvm_regs
from tests.guestasm import assemble

# Stores and read-modify-writes as a driver aims them at MMIO, and the forms that exercise each
# part of the decoder: prefixes, REX, ModRM / SIB / displacements, every kind of immediate, the
# 0F, 0F 38 and 0F 3A maps, VEX and EVEX.
COMMON = [
    "movb $5, (%eax)",
    "movw $0x1234, 8(%ebx)",
    "movl $5, 0x100100",
    "movl %eax, (%esi,%ecx,4)",
    "movl %eax, 0x12(%esp)",
    "movl $0x12345678, 0x1000(%ebp,%edi,2)",
    "mov %ax, (%edx)",
    "mov %al, 0x80(%ebx)",
    "movl %eax, (%ebp)",
    "mov %eax, 0x100104",
    "addl $1, (%eax)",
    "addl $0x1000, 4(%eax)",
    "orb $0x80, (%ecx)",
    "andw $0xfff0, (%edx)",
    "incl (%eax)",
    "notl 8(%eax)",
    "testl $0x100, (%eax)",
    "testb $1, (%eax)",
    "negw (%eax)",
    "xchg %eax, (%ebx)",
    "lock cmpxchg %ecx, (%ebx)",
    "lock xadd %eax, (%ecx)",
    "shll $3, (%eax)",
    "shll (%eax)",
    "sete (%eax)",
    "btsl $5, (%eax)",
    "btsl %ecx, (%eax)",
    "shldl $4, %eax, (%ebx)",
    "movnti %eax, (%ebx)",
    "movups %xmm0, (%eax)",
    "movdqa %xmm1, 0x10(%eax)",
    "movq %xmm0, (%eax)",
    "pshufd $0x1b, (%eax), %xmm0",
    "pextrd $1, %xmm0, (%eax)",
    "pmovzxbw (%eax), %xmm1",
    "vmovdqu %ymm0, (%eax)",
    "vpextrd $2, %xmm1, 4(%eax)",
    "vmovdqu32 %zmm0, 0x40(%eax)",
    "rep stosl",
    "rep movsb",
    "stosw",
    "rep insb",
    "fstps (%eax)",
    "popl (%eax)",
    "pushl $0x12345678",
    "pushl $1",
    "imul $0x1000, (%eax), %ecx",
    "imul $3, (%eax), %ecx",
    "enter $16, $0",
    "ret $8",
    "int $0x80",
    "in $0x71, %al",
    "cpuid",
    "rdtsc",
    "wrmsr",
    "mov %cr0, %eax",
    "mov %fs, (%eax)",
    "movzbl (%eax), %ecx",
    "cmovne (%eax), %edx",
]
ONLY_32 = [
    "movl %eax, %fs:(%ebx)",
    "mov %eax, (%bx,%si)",
    "movw $1, (%bp)",
    "movl $1, 0x1234",
    "addr16 movl $1, 0x1234",
    "mov %al, 0x12345678",
    "ljmp $0x10, $0x1000",
    "lcall $0x10, $0x1000",
    "jmp .+0x100",
    "jne .+0x100",
    "call .+0x100",
]
ONLY_64 = [
    "movq $5, (%rax)",
    "movq %rax, (%r12)",
    "movq %rax, (%r13)",
    "movl %r8d, 0x10(%r9,%r10,8)",
    "movl $5, 0x100(%rip)",
    "movq %rax, 0x1000(%rip)",
    "movb %sil, (%rdi)",
    "movabs %rax, 0x1122334455667788",
    "movabs $0x1122334455667788, %rax",
    "movabs %al, 0x100000",
    "addr32 movl $1, (%eax)",
    "addq $0x1000, 8(%rax)",
    "lock orq $1, (%rbx)",
    "rep stosq",
    "rep movsq",
    "movnti %rax, (%rbx)",
    "vmovdqu %ymm8, (%r9)",
    "vmovdqu64 %zmm16, 0x80(%rax)",
    "movw %gs, (%rax)",
    "movq %cr3, %rax",
    "xchgq %rax, (%rbx)",
    "pushq $0x1000",
    "movq %rax, %fs:0x28",
]


@pytest.mark.parametrize(("insn", "bits"), [(i, 32) for i in COMMON + ONLY_32] + [(i, 64) for i in ONLY_64])
def test_decoded_length_is_the_assembler_s(insn, bits):
    code = assemble(f"{insn}\nnop", bits=bits)
    length = len(code) - 1
    assert decode(code, bits).length == length, code.hex()


def _addresses_64(insn: str) -> str:
    """`insn` with 64-bit address registers: (%eax) -> (%rax)."""
    return re.sub(r"\(([^)]*)\)", lambda m: "(" + m.group(1).replace("%e", "%r") + ")", insn)


@pytest.mark.parametrize("insn", [i for i in COMMON if "(%e" in i and not i.startswith("popl")])
def test_decoded_length_in_64_bit_code(insn):
    """The same stores with 64-bit address registers."""
    insn = _addresses_64(insn)
    code = assemble(f"{insn}\nnop", bits=64)
    assert decode(code, 64).length == len(code) - 1, code.hex()


@pytest.mark.parametrize("insn", ["movl $5, (%bx)", "movw %ax, (%bp,%di)", "movl %eax, (%ecx)", "rep stosw"])
def test_decoded_length_in_16_bit_code(insn):
    code = assemble(f"{insn}\nnop", bits=16)
    assert decode(code, 16).length == len(code) - 1, code.hex()


def test_rep_string_store_stays_on_the_instruction():
    """x86_emulate_insn moves RIP past a REP string instruction only at the entry that finds RCX
    0, so each iteration's write exit has RIP on it; without REP, past it."""
    code = assemble("rep stosl", bits=64)
    assert write_exit(code, 0x1000, 64).rip == 0x1000
    plain = assemble("stosl", bits=64)
    assert write_exit(plain, 0x1000, 64).rip == 0x1000 + len(plain)


def test_cut_off_bytes_give_none():
    code = assemble("movl $5, 0x100100", bits=32)
    assert write_exit(code[:-1], 0x1000, 32) is None
    assert write_exit(code, 0x1000, 32).rip == 0x1000 + len(code)


def test_string_step_follows_df_and_the_address_size():
    """register_address_increment: RDI / RSI by the element against DF, RCX -1 under REP, in the
    address size (a 16-bit one wraps inside the low word, a 32-bit one zero-extends); -1 undoes it."""
    regs = kvm_regs(rdi=0x1_0000_FFFE, rsi=0x2000, rcx=0x1_0000_0000, rflags=0x2)
    movsw16 = decode(assemble("rep movsw", bits=16), 16)
    step_string(regs, movsw16, 1)
    assert (regs.rdi, regs.rsi, regs.rcx) == (0x1_0000_0000, 0x2002, 0x1_0000_FFFF)
    step_string(regs, movsw16, -1)
    assert (regs.rdi, regs.rsi, regs.rcx) == (0x1_0000_FFFE, 0x2000, 0x1_0000_0000)
    down = kvm_regs(rdi=0x1_0000_1000, rsi=5, rcx=3, rflags=0x2 | 1 << 10)  # DF set
    stosl32 = decode(assemble("addr32 stosl", bits=64), 64)
    step_string(down, stosl32, 1)
    assert (down.rdi, down.rsi, down.rcx) == (0x0FFC, 5, 3)  # ECX untouched without REP
