"""Where KVM reports RIP during an MMIO write exit: past the writing instruction (its length decoded).

KVM's emulator finishes an instruction that writes MMIO before the exit (x86_emulate_instruction:
the write is queued in vcpu->mmio_fragments, writeback then sets RIP to ctxt->_eip, the end that
x86_decode_insn found), so KVM_GET_REGS during a KVM_EXIT_MMIO with is_write reads RIP past it. A
REP string store is the exception: each iteration exits with RIP on it, RCX, RSI and RDI already
stepped (the writeback of x86_emulate_insn, which moves RIP past only at the entry that finds RCX 0).

The model's engine exits from the middle of the instruction (its write hook), RIP still on it, so
the vCPU asks `write_exit` what KVM would report (and `step_string` for a string store's
registers), with the code read by `code_at_rip`. This is the length half of x86_decode_insn:
legacy prefixes, REX, the one-, two- and three-byte opcode maps, VEX and EVEX, ModRM / SIB /
displacement and the immediate, from the opcode tables of the SDM (Vol. 2, Appendix A). It does not
check that the instruction is valid (the engine ran it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unicorn import Uc, UcError

from pcihole.hv.model import cpu
from pcihole.hv.model.engine_state import EngineState
from pcihole.hv.model.interrupts import Fault, LinearMemory
from pcihole.hv.uapi import kvm_regs

X86_EFLAGS_DF = 1 << 10

MAX_INSN_BYTES = 15  # X86_MAX_INSTRUCTION_LENGTH

_LEGACY_PREFIXES = frozenset((0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3))
_OPERAND_SIZE, _ADDRESS_SIZE, _REPNE, _REP = 0x66, 0x67, 0xF2, 0xF3
# String instructions that store (INS, MOVS, STOS): what a REP prefix repeats for an MMIO write.
_STORING_STRINGS = frozenset((0x6C, 0x6D, 0xA4, 0xA5, 0xAA, 0xAB))


def _one_byte_map() -> tuple[frozenset[int], dict[int, str]]:
    """The one-byte map: the opcodes with a ModRM byte, and each opcode's immediate ("b": 1 byte,
    "w": 2, "z": 2 or 4 by operand size, "v": 2, 4 or 8, "a": an address-size offset, "p": a far
    pointer, "e": ENTER's 3); the group opcodes F6 / F7 (TEST's immediate) are special-cased."""
    modrm = {row + col for row in range(0x00, 0x40, 0x08) for col in range(4)}
    modrm |= {0x62, 0x63, 0x69, 0x6B, *range(0x80, 0x90), 0xC0, 0xC1, 0xC4, 0xC5, 0xC6, 0xC7}
    modrm |= {*range(0xD0, 0xD4), *range(0xD8, 0xE0), 0xF6, 0xF7, 0xFE, 0xFF}
    imm = {row + 4: "b" for row in range(0x00, 0x40, 0x08)} | {
        row + 5: "z" for row in range(0x00, 0x40, 0x08)
    }
    imm |= {0x68: "z", 0x69: "z", 0x6A: "b", 0x6B: "b", **dict.fromkeys(range(0x70, 0x80), "b")}
    imm |= {0x80: "b", 0x81: "z", 0x82: "b", 0x83: "b", 0x9A: "p", 0xA8: "b", 0xA9: "z"}
    imm |= {**dict.fromkeys(range(0xA0, 0xA4), "a"), **dict.fromkeys(range(0xB0, 0xB8), "b")}
    imm |= {**dict.fromkeys(range(0xB8, 0xC0), "v"), 0xC0: "b", 0xC1: "b", 0xC2: "w", 0xC6: "b", 0xC7: "z"}
    imm |= {0xC8: "e", 0xCA: "w", 0xCD: "b", 0xD4: "b", 0xD5: "b", **dict.fromkeys(range(0xE0, 0xE8), "b")}
    imm |= {0xE8: "z", 0xE9: "z", 0xEA: "p", 0xEB: "b"}
    return frozenset(modrm), imm


_MODRM_1, _IMM_1 = _one_byte_map()
# Two-byte map (0F xx): the opcodes without ModRM, and those with an immediate byte (Jcc's rel z
# apart).
_NO_MODRM_0F = frozenset((0x05, 0x06, 0x07, 0x08, 0x09, 0x0B, 0x0E, *range(0x30, 0x38), 0x77))
_NO_MODRM_0F |= frozenset((*range(0x80, 0x90), 0xA0, 0xA1, 0xA2, 0xA8, 0xA9, 0xAA, *range(0xC8, 0xD0)))
_IMM8_0F = frozenset((0x0F, 0x70, 0x71, 0x72, 0x73, 0xA4, 0xAC, 0xBA, 0xC2, 0xC4, 0xC5, 0xC6))


class _Code:
    """The instruction's bytes, read in order."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def next(self) -> int:
        if self.at >= len(self.data):
            raise IndexError("past the bytes read")
        self.at += 1
        return self.data[self.at - 1]

    def peek(self) -> int | None:
        return self.data[self.at] if self.at < len(self.data) else None

    def skip(self, n: int) -> None:
        self.at += n
        if self.at > len(self.data):
            raise IndexError("past the bytes read")


def _modrm_bytes(code: _Code, address_bits: int) -> None:
    """Skip ModRM and the SIB byte and displacement it calls for."""
    modrm = code.next()
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return
    if address_bits == 16:
        code.skip({0: 2 if rm == 6 else 0, 1: 1, 2: 2}[mod])
        return
    if rm == 4:
        sib = code.next()
        if mod == 0 and sib & 7 == 5:
            code.skip(4)
    code.skip({0: 4 if rm == 5 else 0, 1: 1, 2: 4}[mod])


@dataclass(frozen=True)
class Decoded:
    """What the MMIO write exit needs of an instruction."""

    length: int
    address_bits: int
    #: A string store (INS, MOVS, STOS): its element's bytes (0: not one), whether it steps RSI
    #: too (MOVS), and whether a REP prefix repeats it.
    string_bytes: int = 0
    string_source: bool = False
    rep: bool = False


def decode(data: bytes, cs_bits: int) -> Decoded:
    """The instruction `data` starts with, for code of `cs_bits` (16, 32: CS.D; 64: CS.L).
    IndexError where `data` ends first."""
    code = _Code(data)
    long_mode = cs_bits == 64
    prefixes: set[int] = set()
    rex_w = False
    while True:
        byte = code.next()
        if byte in _LEGACY_PREFIXES:
            prefixes.add(byte)
            rex_w = False  # a REX before a legacy prefix is ignored
            continue
        if long_mode and 0x40 <= byte <= 0x4F:
            rex_w = bool(byte & 8)
            byte = code.next()
            if byte in _LEGACY_PREFIXES or 0x40 <= byte <= 0x4F:
                code.at -= 1
                continue
        break
    if cs_bits == 16:
        operand_bits = 32 if _OPERAND_SIZE in prefixes else 16
    else:
        operand_bits = 16 if _OPERAND_SIZE in prefixes else 32
    if rex_w:
        operand_bits = 64
    if long_mode:
        address_bits = 32 if _ADDRESS_SIZE in prefixes else 64
    else:
        address_bits = (48 - cs_bits) if _ADDRESS_SIZE in prefixes else cs_bits
    z = 2 if operand_bits == 16 else 4
    opcode = byte
    following = code.peek()
    vex_like = opcode in (0xC4, 0xC5, 0x62) and following is not None
    if vex_like and (long_mode or following >> 6 == 3):  # type: ignore[operator]
        _vex_or_evex(code, opcode, address_bits)
        return Decoded(code.at, address_bits)
    if opcode == 0x0F:
        second = code.next()
        if second in (0x38, 0x3A):
            code.next()
            _modrm_bytes(code, address_bits)
            code.skip(1 if second == 0x3A else 0)
        elif 0x80 <= second <= 0x8F:
            code.skip(z)
        elif second not in _NO_MODRM_0F:
            _modrm_bytes(code, address_bits)
            code.skip(1 if second in _IMM8_0F else 0)
        return Decoded(code.at, address_bits)
    if opcode in _MODRM_1:
        reg = ((code.peek() or 0) >> 3) & 7
        _modrm_bytes(code, address_bits)
        if opcode in (0xF6, 0xF7) and reg in (0, 1):  # TEST r/m, imm
            code.skip(1 if opcode == 0xF6 else z)
    kind = _IMM_1.get(opcode)
    if kind is not None:
        code.skip(_immediate_bytes(kind, operand_bits, address_bits, z))
    if opcode not in _STORING_STRINGS:
        return Decoded(code.at, address_bits)
    return Decoded(
        code.at,
        address_bits,
        string_bytes=1 if opcode in (0x6C, 0xA4, 0xAA) else operand_bits // 8,
        string_source=opcode in (0xA4, 0xA5),
        rep=bool(prefixes & {_REP, _REPNE}),
    )


def _immediate_bytes(kind: str, operand_bits: int, address_bits: int, z: int) -> int:
    if kind == "b":
        return 1
    if kind == "w":
        return 2
    if kind == "z":
        return z
    if kind == "v":
        return operand_bits // 8
    if kind == "a":
        return address_bits // 8
    if kind == "p":
        return z + 2
    return 3  # "e": ENTER imm16, imm8


def _vex_or_evex(code: _Code, prefix: int, address_bits: int) -> None:
    """Skip a VEX (C5: 2 bytes, C4: 3) or EVEX (62: 4) prefix, the opcode, ModRM and the immediate
    of map 3 (0F 3A) and of the two-byte map's imm8 opcodes."""
    if prefix == 0xC5:
        code.next()
        opcode_map = 1
    else:
        opcode_map = code.next() & (0x1F if prefix == 0xC4 else 0x07)
        code.next()
        if prefix == 0x62:
            code.next()
    opcode = code.next()
    _modrm_bytes(code, address_bits)
    if opcode_map == 3 or (opcode_map == 1 and opcode in _IMM8_0F):
        code.skip(1)


@dataclass(frozen=True)
class WriteExit:
    """Where KVM's emulator has left the registers when an instruction's MMIO write exits."""

    rip: int  # past the instruction; on it for a REP string store
    string: Decoded | None  # a string store, whose RDI (RSI) and, under REP, RCX were stepped


def write_exit(code: bytes, rip: int, cs_bits: int) -> WriteExit | None:
    """The MMIO write exit of the instruction at `rip` (`code`: its bytes, up to 15), as KVM reports
    it: RIP past the instruction, but on it for a REP string store, whose every iteration exits
    with RIP there (the emulator moves it past only at the entry that finds RCX 0). None where
    `code` does not hold the whole instruction."""
    try:
        decoded = decode(code, cs_bits)
    except IndexError:
        return None
    if decoded.length > MAX_INSN_BYTES:
        return None
    string = decoded if decoded.string_bytes else None
    if decoded.rep:
        return WriteExit(rip, string)
    end = rip + decoded.length
    return WriteExit(end & 0xFFFFFFFFFFFFFFFF if cs_bits == 64 else end & 0xFFFFFFFF, string)


def _increment(register: int, delta: int, address_bits: int) -> int:
    """register_address_increment: the address-size part of `register` plus `delta`, a 32-bit one
    zero-extended (assign_register), a 16-bit one merged into the rest."""
    if address_bits == 16:
        return register & ~0xFFFF | (register + delta) & 0xFFFF
    return (register + delta) & ((1 << address_bits) - 1)


def step_string(regs: kvm_regs, string: Decoded, direction: int) -> None:
    """A string store's registers from before its iteration to after it (`direction` 1: the
    emulator's writeback, register_address_increment of RDI, RSI for MOVS, by the element size
    against RFLAGS.DF, and RCX by -1 under REP), or back (-1)."""
    step = -string.string_bytes if regs.rflags & X86_EFLAGS_DF else string.string_bytes
    bits = string.address_bits
    regs.rdi = _increment(regs.rdi, direction * step, bits)
    if string.string_source:
        regs.rsi = _increment(regs.rsi, direction * step, bits)
    if string.rep:
        regs.rcx = _increment(regs.rcx, -direction, bits)


_CS_BITS = {cpu.CpuMode.REAL: 16, cpu.CpuMode.PROTECTED_32: 32, cpu.CpuMode.LONG_64: 64}


def code_at_rip(
    uc: Uc,
    mode: cpu.CpuMode,
    state: EngineState | None,
    read_ram: Callable[[int, int], bytes | None],
    offset: int,
    size: int,
) -> tuple[bytes, int]:
    """(up to `size` bytes of code at RIP + `offset`, fewer where a page cannot be read; the code's
    width: 16, 32 or 64), through the guest's page tables in long mode (also where a 32-bit engine
    followed the guest there: cpu.live_mode)."""
    live = cpu.live_mode(uc, mode, state)
    long_mode = live is cpu.CpuMode.LONG_64
    linear = cpu.read_rip(uc, mode, state) if long_mode else cpu.program_counter(uc, mode)  # CS.base + IP
    memory = None
    if state is not None:
        state.load()
        memory = LinearMemory(uc, state, read_ram)
    out = b""
    while len(out) < size:
        at = linear + offset + len(out)
        n = min(size - len(out), 0x1000 - (at & 0xFFF))
        try:
            out += memory.read(at, n) if memory is not None else bytes(uc.mem_read(at, n))
        except (Fault, UcError):
            break
    return out, _CS_BITS[live]


def pio_end(code: bytes, rip: int, cs_bits: int) -> int | None:
    """RIP past the IN or OUT at `rip` (`code`: its bytes), None for anything else (INS, OUTS:
    string instructions whose registers the engine steps itself) or code that cannot be read."""
    try:
        length = decode(code, cs_bits).length
    except IndexError:
        return None
    fixed_port = length >= 2 and 0xE4 <= code[length - 2] <= 0xE7  # IN / OUT imm8
    if length > MAX_INSN_BYTES or not (fixed_port or 0xEC <= code[length - 1] <= 0xEF):  # or DX
        return None
    end = rip + length
    return end & 0xFFFFFFFFFFFFFFFF if cs_bits == 64 else end & 0xFFFFFFFF
