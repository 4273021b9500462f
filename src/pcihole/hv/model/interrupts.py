"""Exception and interrupt delivery through the guest's IDT, as the SDM says (Vol. 3A chapter 6).

Unicorn never delivers an exception: cpu_handle_exception (qemu/accel/tcg/cpu-exec.c) calls the
UC_HOOK_INTR hooks instead of QEMU's x86_cpu_do_interrupt, with EIP at the faulting instruction
(a fault) or after it (INT n, INT3, INTO: exception_is_int). This module is x86_cpu_do_interrupt
in Python, following QEMU's do_interrupt64 and do_interrupt_protected (target/i386/seg_helper.c)
step by step: read the gate, check it, find the stack (the TSS's RSP0-2 / IST1-7 in long mode,
SS0:ESP0-SS2:ESP2 in protected mode), push the frame and the error code, load CS and SS (and so
the CPL) and RIP, clear TF/NT/RF/VM and, through an interrupt gate, IF.

A fault met while delivering (a gate beyond the IDT limit, a not-present stack page) is combined
with the one being delivered as check_exception (target/i386/excp_helper.c) and SDM Table 6-5 do:
two contributory faults, or a page fault then a contributory or page fault, make #DF; a fault
while delivering #DF is a triple fault (TripleFault: the vCPU reports KVM_EXIT_SHUTDOWN).

Memory is read and written by linear address: the walk below follows the guest's 4-level page
tables in long mode (paging is off in the model's protected mode), with the accesses the CPU makes
as supervisor accesses ("implicit supervisor-mode accesses", SDM 4.6.1).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from unicorn import Uc, UcError
from unicorn import x86_const as x86

from pcihole.hv.model.engine_state import (
    DESC_B_MASK,
    DESC_DPL_SHIFT,
    DESC_L_MASK,
    HF_INHIBIT_IRQ_MASK,
    HF_LMA_MASK,
    R_CS,
    R_SS,
    EngineState,
    SegmentCache,
    read_flags,
)

# Exception vectors (SDM Table 6-1).
DE, DB, NMI, BP, OF, BR, UD, NM, DF, CSO, TS, NP, SS, GP, PF = range(15)
AC = 17
# Exceptions that push an error code (SDM 6.13): #DF, #TS, #NP, #SS, #GP, #PF, #AC.
_HAS_ERROR_CODE = frozenset({DF, TS, NP, SS, GP, PF, AC})
# Fault-class exceptions (SDM Table 6-1): the RFLAGS image they push has RF set (SDM Vol. 3B
# 17.3.1.1), so that the IRET back to the faulting instruction does not re-trigger a breakpoint.
# QEMU does not do this (do_interrupt64 pushes cpu_compute_eflags as it is); KVM's CPU does.
# A #DF, which only faults raise, pushes it too (as measured on KVM).
_FAULTS = frozenset({DE, BR, UD, NM, DF, TS, NP, SS, GP, PF, 16, AC, 19, 20})
# Contributory exceptions (SDM Table 6-4).
_CONTRIBUTORY = frozenset({DE, TS, NP, SS, GP})

# EFLAGS bits.
TF, IF, NT, RF, VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17

# Descriptor bits, in the descriptor's high dword (QEMU's e2).
_DESC_P = 1 << 15
_DESC_S = 1 << 12
_DESC_CS = 1 << 11  # code segment (type bit 3)
_DESC_C = 1 << 10  # conforming code
_GATE_INT64, _GATE_TRAP64 = 14, 15  # long mode (also the 32-bit gates' types)
_GATE_INT16, _GATE_TRAP16 = 6, 7
_GATE_TASK = 5

# Page-table entry bits and #PF error code bits (SDM 4.7).
_PTE_P, _PTE_W, _PTE_PS = 1 << 0, 1 << 1, 1 << 7
PFERR_PRESENT, PFERR_WRITE = 1 << 0, 1 << 1
_CR0_WP = 1 << 16


class EventKind(Enum):
    EXCEPTION = "exception"  # a fault or trap the CPU raised: may push an error code
    SOFTWARE = "software"  # INT n / INT3 / INTO: the gate's DPL is checked against the CPL
    EXTERNAL = "external"  # an external interrupt or NMI: no error code, no DPL check


class Fault(Exception):  # noqa: N818 - it is the CPU's name for it
    """A fault met while delivering an event: `vector` with `error_code` (and CR2 for #PF)."""

    def __init__(self, vector: int, error_code: int = 0, cr2: int | None = None) -> None:
        super().__init__(f"fault {vector} ({error_code:#x}) during delivery")
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


class TripleFault(Exception):  # noqa: N818
    """A fault while delivering #DF: the processor shuts down (SDM 6.15, interrupt 8)."""


def combine(first: int, second: int) -> int:
    """The event to deliver when `second` is met while delivering `first` (check_exception)."""
    if first == DF:
        raise TripleFault
    if (first in _CONTRIBUTORY and second in _CONTRIBUTORY) or (
        first == PF and (second in _CONTRIBUTORY or second == PF)
    ):
        return DF
    return second


@dataclass
class Event:
    vector: int
    kind: EventKind
    error_code: int = 0


class LinearMemory:
    """Guest memory by linear address, as the CPU reaches it while delivering (supervisor accesses)."""

    def __init__(self, uc: Uc, state: EngineState, read_ram: Callable[[int, int], bytes | None]) -> None:
        """`state` loaded: CR0, CR3 and the mode are read from it."""
        self._uc = uc
        self._long_mode = bool(state.hflags & HF_LMA_MASK)
        self._read_ram = read_ram
        self._walked: dict[tuple[int, bool], int] = {}  # (page, write) -> frame, for one delivery
        self._cr3 = state.cr(3) & 0x000FFFFFFFFFF000
        self._wp = bool(state.cr(0) & _CR0_WP)

    def _translate(self, linear: int, write: bool) -> int:
        if not self._long_mode:
            return linear & 0xFFFFFFFF
        frame = self._walked.get((linear >> 12, write))
        if frame is None:
            frame = self._walk(linear, write) & ~0xFFF
            self._walked[linear >> 12, write] = frame
        return frame | (linear & 0xFFF)

    def _walk(self, linear: int, write: bool) -> int:
        table = self._cr3
        for shift in (39, 30, 21, 12):
            entry = self._read_phys_u64(table + ((linear >> shift) & 0x1FF) * 8)
            if not entry & _PTE_P:
                raise Fault(PF, PFERR_WRITE if write else 0, linear)
            if write and self._wp and not entry & _PTE_W:
                raise Fault(PF, PFERR_PRESENT | PFERR_WRITE, linear)
            frame = entry & 0x000FFFFFFFFFF000
            if shift in (30, 21) and entry & _PTE_PS:
                mask = (1 << shift) - 1
                return (frame & ~mask) | (linear & mask)
            table = frame
        return table | (linear & 0xFFF)

    def _read_phys_u64(self, phys: int) -> int:
        return struct.unpack("<Q", self._phys(phys, 8))[0]

    def _phys(self, phys: int, size: int, data: bytes | None = None) -> bytes:
        try:
            if data is None:
                fast = self._read_ram(phys, size)
                return fast if fast is not None else bytes(self._uc.mem_read(phys, size))
            self._uc.mem_write(phys, data)
            return data
        except UcError:
            # Memory the CPU cannot reach for a descriptor table or a stack: KVM would exit
            # (emulation failure); the guest's view is closest to a fault on that access.
            raise Fault(GP, 0) from None

    def read(self, linear: int, size: int) -> bytes:
        out = b""
        while size:
            n = min(size, 0x1000 - (linear & 0xFFF))
            out += self._phys(self._translate(linear, False), n)
            linear, size = linear + n, size - n
        return out

    def write(self, linear: int, data: bytes) -> None:
        while data:
            n = min(len(data), 0x1000 - (linear & 0xFFF))
            self._phys(self._translate(linear, True), n, data[:n])
            linear, data = linear + n, data[n:]

    def u32(self, linear: int) -> int:
        return struct.unpack("<I", self.read(linear, 4))[0]

    def u64(self, linear: int) -> int:
        return struct.unpack("<Q", self.read(linear, 8))[0]


class Delivery:
    """Deliver events into one engine's guest through its IDT (x86_cpu_do_interrupt)."""

    def __init__(self, uc: Uc, state: EngineState, read_ram: Callable[[int, int], bytes | None]) -> None:
        self._uc = uc
        self._state = state
        self._read_ram = read_ram

    def deliver(self, event: Event) -> None:
        """Deliver `event`, escalating faults met on the way; TripleFault if it cannot be."""
        uc, state = self._uc, self._state
        while True:
            state.load()
            try:
                self._deliver_once(event)
            except Fault as fault:
                if event.kind is EventKind.SOFTWARE:
                    # The fault is the INT instruction's (SDM 6.12.1.1: #GP for a gate of lower
                    # DPL): RIP back on it (Unicorn had moved it to exception_next_eip).
                    rip = uc.reg_read(state.regs.ip)
                    uc.reg_write(state.regs.ip, rip - self._int_length(event.vector, rip))
                first = event.vector if event.kind is EventKind.EXCEPTION else -1
                vector = combine(first, fault.vector)
                if fault.cr2 is not None and vector == PF:
                    uc.reg_write(x86.UC_X86_REG_CR2, fault.cr2)
                event = Event(vector, EventKind.EXCEPTION, 0 if vector == DF else fault.error_code)
                continue
            return

    def _int_length(self, vector: int, next_rip: int) -> int:
        """The length of the INT n / INT3 / INTO / INT1 that ends at `next_rip` (no prefixes)."""
        state = self._state
        mem = LinearMemory(self._uc, state, self._read_ram)
        try:
            before = mem.read(next_rip - 2, 2)
        except Fault:
            return 2
        if before == bytes([0xCD, vector]):
            return 2
        return 1 if before[1] in (0xCC, 0xCE, 0xF1) else 2

    def _deliver_once(self, event: Event) -> None:
        uc, state = self._uc, self._state
        long_mode = bool(state.hflags & HF_LMA_MASK)
        mem = LinearMemory(uc, state, self._read_ram)
        vector = event.vector
        idt = state.table("idt")
        idt_base, idt_limit = idt.base, idt.limit
        gate_bytes = 16 if long_mode else 8
        gate_error = vector * 8 + 2  # IDT flag (bit 1) + EXT=0
        if vector * gate_bytes + gate_bytes - 1 > idt_limit:
            raise Fault(GP, gate_error)
        gate = mem.read(idt_base + vector * gate_bytes, gate_bytes)
        e1, e2 = struct.unpack_from("<II", gate)
        gate_type = (e2 >> 8) & 0x1F
        allowed = (
            (_GATE_INT64, _GATE_TRAP64)
            if long_mode
            else (_GATE_INT64, _GATE_TRAP64, _GATE_INT16, _GATE_TRAP16)
        )
        if gate_type not in allowed:
            raise Fault(GP, gate_error)  # task gates are not modelled (#GP, as a bad type)
        cpl = state.cpl
        if event.kind is EventKind.SOFTWARE and (e2 >> DESC_DPL_SHIFT) & 3 < cpl:
            raise Fault(GP, gate_error)
        if not e2 & _DESC_P:
            raise Fault(NP, gate_error)
        selector = e1 >> 16
        offset = (e2 & 0xFFFF0000) | (e1 & 0xFFFF)
        if long_mode:
            offset |= struct.unpack_from("<I", gate, 8)[0] << 32
        ist = e2 & 7 if long_mode else 0
        if selector & 0xFFFC == 0:
            raise Fault(GP, 0)
        code = self._descriptor(mem, selector)
        c1, c2 = code
        dpl = (c2 >> DESC_DPL_SHIFT) & 3
        if not (c2 & _DESC_S and c2 & _DESC_CS) or dpl > cpl:
            raise Fault(GP, selector & 0xFFFC)
        if not c2 & _DESC_P:
            raise Fault(NP, selector & 0xFFFC)
        if long_mode and (not c2 & DESC_L_MASK or c2 & DESC_B_MASK):
            raise Fault(GP, selector & 0xFFFC)
        if c2 & _DESC_C:
            dpl = cpl
        has_error = event.kind is EventKind.EXCEPTION and vector in _HAS_ERROR_CODE
        rflags = uc.reg_read(state.regs.flags)
        pushed_rflags = rflags | RF if event.kind is EventKind.EXCEPTION and vector in _FAULTS else rflags
        old_ss = state.segment(R_SS)
        old_cs = state.segment(R_CS)
        rip = state.ip
        rsp = state.sp
        if long_mode:
            new_stack = dpl < cpl or ist != 0
            sp = self._tss_rsp(mem, ist + 3 if ist else dpl) if new_stack else rsp
            sp &= ~0xF & 0xFFFFFFFFFFFFFFFF
            frame = [old_ss.selector, rsp, pushed_rflags, old_cs.selector, rip]
            if has_error:
                frame.append(event.error_code)
            sp -= 8 * len(frame)
            mem.write(sp, b"".join(struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF) for v in reversed(frame)))
            new_ss = SegmentCache(dpl, 0, 0, dpl << DESC_DPL_SHIFT) if new_stack else None
        else:
            shift = 1 if gate_type in (_GATE_INT64, _GATE_TRAP64) else 0  # 32- or 16-bit gate
            if dpl < cpl:
                ss_sel, sp = self._tss_stack32(mem, dpl)
                s1, s2 = self._descriptor(mem, ss_sel)
                if ss_sel & 3 != dpl or (s2 >> DESC_DPL_SHIFT) & 3 != dpl or not s2 & _DESC_P:
                    raise Fault(TS, ss_sel & 0xFFFC)
                new_ss = _cache(ss_sel, s1, s2)
                frame = [old_ss.selector, rsp]
            else:
                sp, new_ss, frame = rsp & 0xFFFFFFFF, None, []
            frame += [pushed_rflags, old_cs.selector, rip]
            if has_error:
                frame.append(event.error_code)
            width = 4 if shift else 2
            base = (new_ss or old_ss).base
            for value in frame:
                sp = (sp - width) & 0xFFFFFFFF
                mem.write(base + sp, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))
        # Nothing faults from here on: the new state is committed.
        uc.reg_write(state.regs.sp, sp)
        rflags &= ~(TF | VM | RF | NT)
        if gate_type in (_GATE_INT64, _GATE_INT16):
            rflags &= ~IF
        uc.reg_write(state.regs.flags, rflags)
        uc.reg_write(state.regs.ip, offset)
        state.load()
        if new_ss is not None:
            state.load_segment_cache(R_SS, new_ss)
        state.load_segment_cache(R_CS, _cache((selector & ~3) | dpl, c1, c2))
        state.clear_old_exception()
        state.store()

    def _descriptor(self, mem: LinearMemory, selector: int) -> tuple[int, int]:
        """The (low, high) dwords of the GDT descriptor `selector` names (LDTs are not modelled)."""
        gdt = self._state.table("gdt")
        gdt_base, gdt_limit = gdt.base, gdt.limit
        index = selector & ~7
        if selector & 4 or index + 7 > gdt_limit:
            raise Fault(GP, selector & 0xFFFC)
        low, high = struct.unpack("<II", mem.read(gdt_base + index, 8))
        return low, high

    def _tss_rsp(self, mem: LinearMemory, level: int) -> int:
        """get_rsp_from_tss: RSP0-2 (level 0-2) or IST1-7 (level 4-10) of the 64-bit TSS."""
        tr = self._state.table("tr")
        index = 8 * level + 4
        if index + 7 > tr.limit:
            raise Fault(TS, tr.selector & 0xFFFC)
        return mem.u64(tr.base + index)

    def _tss_stack32(self, mem: LinearMemory, dpl: int) -> tuple[int, int]:
        """get_ss_esp_from_tss: SSn:ESPn of the 32-bit TSS."""
        tr = self._state.table("tr")
        index = dpl * 8 + 4
        if index + 7 > tr.limit:
            raise Fault(TS, tr.selector & 0xFFFC)
        esp = mem.u32(tr.base + index)
        ss = mem.u32(tr.base + index + 4) & 0xFFFF
        return ss, esp


def _cache(selector: int, e1: int, e2: int) -> SegmentCache:
    """The segment cache QEMU's load_segment + cpu_x86_load_seg_cache make of a descriptor."""
    base = (e1 >> 16) | ((e2 & 0xFF) << 16) | (e2 & 0xFF000000)
    limit = (e1 & 0xFFFF) | (e2 & 0x000F0000)
    if e2 & (1 << 23):  # G
        limit = (limit << 12) | 0xFFF
    return SegmentCache(selector, base, limit, e2)


def interrupt_window_open(uc: Uc, state: EngineState) -> bool:
    """An external interrupt can be delivered now: IF set and no STI / MOV SS shadow."""
    if not read_flags(uc) & IF:  # first, without copying the context
        return False
    state.load()
    return not state.hflags & HF_INHIBIT_IRQ_MASK


def syscall(uc: Uc, state: EngineState, insn_length: int) -> Event | None:
    """SYSCALL as the CPU does it (SDM Vol. 2B, SYSCALL), from Unicorn's syscall hook.

    Unicorn's helper_syscall calls the hook with RIP at the instruction and adds the instruction's
    length to RIP after it, so the RIP written here is LSTAR minus that length. Returns #UD where
    EFER.SCE is clear (the caller delivers it).
    """
    efer = uc.msr_read(0xC0000080)
    if not efer & 1:  # EFER.SCE
        return Event(UD, EventKind.EXCEPTION)
    star = uc.msr_read(0xC0000081)
    lstar = uc.msr_read(0xC0000082)
    fmask = uc.msr_read(0xC0000084)
    rip = uc.reg_read(state.regs.ip)
    rflags = uc.reg_read(state.regs.flags)
    uc.reg_write(x86.UC_X86_REG_RCX, rip + insn_length)
    uc.reg_write(x86.UC_X86_REG_R11, rflags & ~RF)
    uc.reg_write(state.regs.flags, rflags & ~fmask & ~RF)
    uc.reg_write(state.regs.ip, (lstar - insn_length) & 0xFFFFFFFFFFFFFFFF)
    selector = (star >> 32) & 0xFFFC
    # CS: flat 64-bit code, DPL 0 (type 0xB, S, P, L); SS: flat data, DPL 0 (type 3, S, P, B).
    flat = 0xFFFFFFFF
    state.load()
    state.load_segment_cache(R_CS, SegmentCache(selector, 0, flat, 0x00A09B00))
    state.load_segment_cache(R_SS, SegmentCache(selector + 8, 0, flat, 0x00C09300))
    state.store()
    return None
