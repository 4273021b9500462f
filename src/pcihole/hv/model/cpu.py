"""The model's x86 CPU: a Unicorn engine started from the kvm_regs / kvm_sregs that set_sregs gave.

Unicorn fixes the CPU mode when the engine is created, so the model reads the mode out of the
special registers the way the hardware would (CR0.PE, CR0.PG, EFER.LMA, CS.L / CS.DB) and supports
the start states of x86_cpu_state.py, real mode and what the guest makes of them:
- real mode: CR0.PE = 0, CS.base = CS.selector << 4;
- 32-bit protected mode, paging off: CS.DB = 1 and CS.base 0;
- 64-bit long mode with paging: EFER.LMA, CR0.PG, CS.L; Unicorn walks the guest's page tables in
  guest memory (through the memslots, as KVM's MMU does).
The engine is loaded with all of kvm_sregs: the segments with their hidden parts, the descriptor
tables, CR0 / CR2 / CR3 / CR4 and EFER (special_registers.py). Anything else raises
UnsupportedCpuState naming the register that is out of reach.
"""

from __future__ import annotations

from enum import Enum

from unicorn import UC_ARCH_X86, UC_MODE_16, UC_MODE_32, UC_MODE_64, Uc
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import UcContext

from pcihole.hv.model.engine_state import DESC_B_MASK, HF_LMA_MASK, R_CS, EngineState
from pcihole.hv.model.special_registers import load_sregs
from pcihole.hv.uapi import kvm_fpu, kvm_regs, kvm_segment, kvm_sregs
from pcihole.hv.x86_cpu_state import EFER_LMA, X86_CR0_PE, X86_CR0_PG

#: The engine's CPU model (uc_ctl_set_cpu_model): what TCG executes depends on its feature words
#: (translate.c checks s->cpuid_*_features before it decodes SMAP's CLAC / STAC, XSAVE, RDRAND,
#: FSGSBASE, ADX, MOVBE, POPCNT, ...), and Unicorn's cpu.c filters a model's features down to what
#: TCG implements. Broadwell is the newest model whose filtered words lose nothing Linux 6.1 uses
#: that TCG runs: SMEP, SMAP, FSGSBASE, ERMS, BMI1/2, ADX, XSAVE / XSAVEOPT, RDRAND, RDTSCP,
#: POPCNT, MOVBE, AES, PCLMULQDQ (no AVX, PCID or INVPCID: QEMU 5.0's TCG has none of them).
#: cpuid.py offers the guest exactly the instructions measured to run (tests/model/test_cpuid.py).
ENGINE_CPU_MODEL = x86.UC_CPU_X86_BROADWELL


class UnsupportedCpuState(ValueError):
    """The model cannot run a vCPU in this state (it is not one the model implements)."""


class CpuMode(Enum):
    REAL = UC_MODE_16
    PROTECTED_32 = UC_MODE_32
    LONG_64 = UC_MODE_64


_GPRS_64 = (
    ("rax", x86.UC_X86_REG_RAX), ("rbx", x86.UC_X86_REG_RBX), ("rcx", x86.UC_X86_REG_RCX),
    ("rdx", x86.UC_X86_REG_RDX), ("rsi", x86.UC_X86_REG_RSI), ("rdi", x86.UC_X86_REG_RDI),
    ("rsp", x86.UC_X86_REG_RSP), ("rbp", x86.UC_X86_REG_RBP), ("r8", x86.UC_X86_REG_R8),
    ("r9", x86.UC_X86_REG_R9), ("r10", x86.UC_X86_REG_R10), ("r11", x86.UC_X86_REG_R11),
    ("r12", x86.UC_X86_REG_R12), ("r13", x86.UC_X86_REG_R13), ("r14", x86.UC_X86_REG_R14),
    ("r15", x86.UC_X86_REG_R15), ("rip", x86.UC_X86_REG_RIP), ("rflags", x86.UC_X86_REG_RFLAGS),
)  # fmt: skip
_GPRS_32 = (
    ("rax", x86.UC_X86_REG_EAX), ("rbx", x86.UC_X86_REG_EBX), ("rcx", x86.UC_X86_REG_ECX),
    ("rdx", x86.UC_X86_REG_EDX), ("rsi", x86.UC_X86_REG_ESI), ("rdi", x86.UC_X86_REG_EDI),
    ("rsp", x86.UC_X86_REG_ESP), ("rbp", x86.UC_X86_REG_EBP), ("rip", x86.UC_X86_REG_EIP),
    ("rflags", x86.UC_X86_REG_EFLAGS),
)  # fmt: skip


def reset_sregs() -> kvm_sregs:
    """The special registers of a freshly created KVM vCPU (kvm_vcpu_reset): real mode at f000:fff0."""
    sregs = kvm_sregs()
    sregs.cs = kvm_segment(base=0xFFFF0000, limit=0xFFFF, selector=0xF000, type=0xB, present=1, s=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, kvm_segment(base=0, limit=0xFFFF, selector=0, type=3, present=1, s=1))
    sregs.tr = kvm_segment(base=0, limit=0xFFFF, type=0xB, present=1)
    sregs.ldt = kvm_segment(base=0, limit=0xFFFF, type=2, present=1)
    sregs.gdt.limit = sregs.idt.limit = 0xFFFF
    sregs.cr0 = 0x60000010
    sregs.apic_base = 0xFEE00900
    return sregs


def reset_regs() -> kvm_regs:
    return kvm_regs(rip=0xFFF0, rflags=0x2, rdx=0x600)


def cpu_mode(sregs: kvm_sregs) -> CpuMode:
    """Which Unicorn mode runs this state, or UnsupportedCpuState naming what is out of reach.

    Every segment is loaded as given, hidden parts included (special_registers.py), but CS: the
    engine starts at a linear address that emu_start makes CS.base + IP from the selector in real
    mode (selector << 4) and takes as EIP in protected mode (a CS base of 0), and reads code there.
    """
    cs = sregs.cs
    if not sregs.cr0 & X86_CR0_PE:
        if cs.base != cs.selector << 4:
            raise UnsupportedCpuState(
                f"real mode with cs.base {cs.base:#x} != selector {cs.selector:#x} << 4 "
                "(the model starts real-mode code at CS.selector << 4 + IP)"
            )
        return CpuMode.REAL
    if sregs.efer & EFER_LMA:
        if not (sregs.cr0 & X86_CR0_PG and cs.l):
            raise UnsupportedCpuState("EFER.LMA without CR0.PG and a 64-bit CS (compatibility mode)")
        return CpuMode.LONG_64
    if sregs.cr0 & X86_CR0_PG:
        raise UnsupportedCpuState("32-bit paging (the model runs protected mode with paging off only)")
    if not cs.db:
        raise UnsupportedCpuState("16-bit protected mode (CS.DB = 0)")
    if cs.base != 0:
        raise UnsupportedCpuState(
            f"cs.base {cs.base:#x} in protected mode (the model runs 32-bit code with a CS base of 0 only)"
        )
    return CpuMode.PROTECTED_32


def empty_engine(mode: CpuMode) -> Uc:
    """A Unicorn engine in `mode` with the model's CPU and nothing else."""
    uc = Uc(UC_ARCH_X86, mode.value)
    # Before anything else touches the CPU (Unicorn creates it on first use): see ENGINE_CPU_MODEL.
    uc.ctl_set_cpu_model(ENGINE_CPU_MODEL)
    return uc


def new_engine(mode: CpuMode, regs: kvm_regs, sregs: kvm_sregs) -> Uc:
    """A Unicorn engine in `mode` holding `regs` and `sregs` (special_registers.load_sregs: the
    segments with the hidden parts given, not a fresh engine's)."""
    uc = empty_engine(mode)
    state = EngineState(uc, long_mode=mode is CpuMode.LONG_64)
    if not state.layout_ok():
        raise UnsupportedCpuState(
            "segment registers: the engine's CPUX86State layout is not engine_state.py's, so their "
            "hidden parts cannot be loaded"
        )
    load_sregs(uc, state, sregs)
    write_regs(uc, mode, regs)
    return uc


def write_fpu(uc: Uc, fpu: kvm_fpu) -> None:
    """KVM_SET_FPU's control words: FCW and MXCSR."""
    uc.reg_write(x86.UC_X86_REG_FPCW, fpu.fcw)
    uc.reg_write(x86.UC_X86_REG_MXCSR, fpu.mxcsr)


# kvm_regs' names in the order of QEMU's env->regs[] (R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, R_EBP,
# R_ESI, R_EDI, R_R8..R_R15), as the uc_context copy holds them.
_QEMU_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)))


def live_mode(uc: Uc, mode: CpuMode, state: EngineState | None) -> CpuMode:
    """The mode the guest runs in now, which is not always the mode `uc` was created in.

    Unicorn fixes an engine's mode at uc_open: it selects the register ids uc_reg_read and
    uc_reg_write serve and the width uc_emu_start writes the start address with. The CPU under it
    follows the guest: a UC_MODE_32 engine enters long mode when the guest sets CR0.PG with
    EFER.LME (QEMU's cpu_x86_update_cr0 sets HF_LMA) and runs 64-bit code after a far jump to a
    64-bit CS, as Linux's PVH entry does (pvh_start_xen), but its RAX / RIP / RSP read 0 through
    the API and EAX the low half. HF_LMA in hflags (through the uc_context copy) says which it is;
    CR0.PG, which the 32-bit API reads, rules long mode out cheaply first.

    A UC_MODE_16 engine follows a guest into protected mode too, but its emu_start starts at
    CS.selector * 16 + IP, 16 bits of it: once the guest has a CS the 32-bit engine runs (a far
    jump to a 32-bit code segment based at 0), it runs there.
    """
    if mode is CpuMode.REAL:
        if state is None or not uc.reg_read(x86.UC_X86_REG_CR0) & X86_CR0_PE:
            return mode
        state.load()
        cs = state.segment(R_CS)
        runs_32 = cs.flags & DESC_B_MASK and cs.base == 0 and not state.cr(0) & X86_CR0_PG
        return CpuMode.PROTECTED_32 if runs_32 else mode
    if state is None or (mode is not CpuMode.LONG_64 and not uc.reg_read(x86.UC_X86_REG_CR0) & X86_CR0_PG):
        return mode
    state.load()
    if state.hflags & HF_LMA_MASK:
        return CpuMode.LONG_64
    return CpuMode.PROTECTED_32 if state.cr(0) & X86_CR0_PE else CpuMode.REAL


def carry_state(old: Uc, new: Uc, context: UcContext | None = None) -> None:
    """Give engine `new` all of `old`'s CPU state, or the `context` saved from it earlier: what
    uc_context_save copies (CPUX86State up to end_reset_fields: registers, segments with their
    hidden parts, control and descriptor-table registers, MSRs, FPU / SSE state, hflags). Memory
    and hooks are the caller's."""
    new.context_restore(context if context is not None else old.context_save())


def write_regs(
    uc: Uc, mode: CpuMode, regs: kvm_regs, state: EngineState | None = None, *, rip: bool = True
) -> None:
    """KVM_SET_REGS into `uc`; `state` (the engine's EngineState) lets a 32-bit engine that the
    guest took into long mode get all 64 bits (through the uc_context copy: see live_mode).
    `rip=False` leaves RIP alone: from a callback in the middle of an instruction, a RIP write
    (even of the value it holds) makes Unicorn leave the block and run that instruction again."""
    if mode is not CpuMode.LONG_64 and live_mode(uc, mode, state) is CpuMode.LONG_64:
        assert state is not None
        uc.reg_write(x86.UC_X86_REG_EFLAGS, regs.rflags)
        # The API's EIP write is what makes a callback's change of RIP take effect (Unicorn
        # leaves the translation block: quit_request); the copy then sets all 64 bits.
        if rip:
            uc.reg_write(x86.UC_X86_REG_EIP, regs.rip & 0xFFFFFFFF)
        state.load()
        state.set_gprs([getattr(regs, name) for name in _QEMU_GPR_ORDER])
        if rip:
            state.ip = regs.rip
        state.store()
        return
    table = _GPRS_64 if mode is CpuMode.LONG_64 else _GPRS_32
    for name, reg in table:
        if rip or name != "rip":
            uc.reg_write(reg, getattr(regs, name))


def read_regs(uc: Uc, mode: CpuMode, state: EngineState | None = None) -> kvm_regs:
    """KVM_GET_REGS from `uc` (`state`: as for write_regs)."""
    regs = kvm_regs()
    if mode is not CpuMode.LONG_64 and live_mode(uc, mode, state) is CpuMode.LONG_64:
        assert state is not None  # live_mode loaded it
        for name, value in zip(_QEMU_GPR_ORDER, state.gprs(), strict=True):
            setattr(regs, name, value)
        regs.rip = state.ip
        regs.rflags = uc.reg_read(x86.UC_X86_REG_EFLAGS)  # computed from the lazy flags (cc_op)
        return regs
    table = _GPRS_64 if mode is CpuMode.LONG_64 else _GPRS_32
    for name, reg in table:
        setattr(regs, name, uc.reg_read(reg))
    return regs


def read_rip(uc: Uc, mode: CpuMode, state: EngineState | None = None) -> int:
    """read_regs(uc, mode, state).rip, with one register read instead of eighteen: asked at every
    MMIO and port-I/O exit (vcpu.py's exit_to_user)."""
    if mode is not CpuMode.LONG_64 and live_mode(uc, mode, state) is CpuMode.LONG_64:
        assert state is not None  # live_mode loaded it
        return state.ip
    return uc.reg_read(x86.UC_X86_REG_RIP if mode is CpuMode.LONG_64 else x86.UC_X86_REG_EIP)


def program_counter(uc: Uc, mode: CpuMode) -> int:
    """The address to start emulation at: Unicorn's emu_start takes a linear address (CS.base + IP)."""
    if mode is CpuMode.LONG_64:
        return uc.reg_read(x86.UC_X86_REG_RIP)
    ip = uc.reg_read(x86.UC_X86_REG_EIP)
    if mode is CpuMode.REAL:
        return (uc.reg_read(x86.UC_X86_REG_CS) << 4) + (ip & 0xFFFF)
    return ip
