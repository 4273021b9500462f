"""`EngineState`: the parts of Unicorn's CPUX86State that its API does not reach, through uc_context.

Delivering an exception or interrupt changes the privilege level and the hidden parts of CS and SS
(SDM Vol. 3A 6.12.1). Unicorn's uc_reg_write cannot do that: in 64-bit mode a write of CS or SS
sets the selector only, in 32-bit mode it loads the segment with helper_load_seg, which refuses an
SS of another privilege level (#GP), and the CPL (hflags bits 0-1) is set only by loading SS
(cpu_x86_load_seg_cache). Two more fields must be reached: `error_code` (the #PF / #GP error code
QEMU's raise_interrupt2 stored) and `old_exception`, which QEMU's check_exception uses to turn a
second contributory fault into #DF and which only x86_cpu_do_interrupt resets (never called in
Unicorn: without a reset, the second #GP of a guest's life would reach the hook as #DF).

uc_context_save copies CPUX86State up to end_reset_fields into the context's data, and
uc_context_restore copies it back (memcpy): the fields are read and written there. Their offsets
are QEMU 5.0's target/i386/cpu.h layout as built in the unicorn 2.1.4 wheel (regs at 0, eip 128,
hflags 176, segs 184 (24 bytes each), cr 424; error_code and old_exception found by provoking a
#GP with a known error code and a #DE then a #DF); `layout_ok()` checks them against what
uc_reg_read returns and the reset value of old_exception, and the model delivers nothing (every
exception is a Shutdown, as before) where they do not match.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from unicorn import Uc, UcError
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import uclib

_DATA = 40  # offsetof(struct uc_context, data) (include/uc_priv.h, 64-bit host)
_CONTEXT_BYTES = 5608  # uc_context_size() of the unicorn 2.1.4 wheel (header + end_reset_fields)
_EIP = 128
_HFLAGS = 176
_SEGS = 184
_SEGMENT_BYTES = 24  # SegmentCache: u32 selector, (pad), u64 base, u32 limit, u32 flags
_LDT, _TR, _GDT, _IDT = 328, 352, 376, 400  # SegmentCache ldt, tr, gdt, idt
_CR = 424
_ERROR_CODE = 5384
_EXCEPTION_IS_INT = 5388
_OLD_EXCEPTION = 5496
# The SVM fields after old_exception (cpu.h: uint64_t vm_vmcb, tsc_offset, intercept): msr_intercept.py.
_VM_VMCB = 5504
_INTERCEPT = 5520

# QEMU's segment register indices (R_ES, R_CS, R_SS, R_DS, R_FS, R_GS).
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)

# hflags bits (target/i386/cpu.h HF_*).
HF_CPL_MASK = 3
HF_INHIBIT_IRQ_MASK = 1 << 3
HF_CS32_MASK = 1 << 4
HF_SS32_MASK = 1 << 5
HF_ADDSEG_MASK = 1 << 6
HF_LMA_MASK = 1 << 14
HF_CS64_MASK = 1 << 15
HF_GUEST_MASK = 1 << 21  # "SVM intercepts are active": msr_intercept.py
# hflags2: HF2_NMI_MASK, "CPU serving NMI": set by delivery, cleared by IRET (helper_iret_*).
HF2_NMI_MASK = 1 << 2

# Descriptor flag bits as QEMU keeps them in SegmentCache.flags (the descriptor's high dword).
DESC_DPL_SHIFT = 13
DESC_B_MASK = 1 << 22
DESC_L_MASK = 1 << 21


@dataclass(frozen=True)
class RegisterIds:
    ax: int
    sp: int
    ip: int
    flags: int


REGS_64 = RegisterIds(x86.UC_X86_REG_RAX, x86.UC_X86_REG_RSP, x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS)
REGS_32 = RegisterIds(x86.UC_X86_REG_EAX, x86.UC_X86_REG_ESP, x86.UC_X86_REG_EIP, x86.UC_X86_REG_EFLAGS)


_FLAGS_VALUE = ctypes.c_uint64()


def read_flags(uc: Uc) -> int:
    """RFLAGS through uc_reg_read with no binding in between (the binding's reg_read costs ~7 us
    in a hook, this ~1 us): the boundary hook reads IF at every block while an interrupt waits."""
    _FLAGS_VALUE.value = 0
    err = uclib.uc_reg_read(uc._uch, x86.UC_X86_REG_EFLAGS, ctypes.byref(_FLAGS_VALUE))
    if err:
        raise UcError(err)
    return _FLAGS_VALUE.value


@dataclass
class SegmentCache:
    selector: int
    base: int
    limit: int
    flags: int

    @property
    def dpl(self) -> int:
        return (self.flags >> DESC_DPL_SHIFT) & 3


class EngineState:
    """Read, change and write back the hidden CPU state of one engine (see the module docstring)."""

    def __init__(self, uc: Uc, long_mode: bool) -> None:
        self._uc = uc
        #: The register ids of this engine's mode (a 32-bit engine ignores the 64-bit ones).
        self.regs = REGS_64 if long_mode else REGS_32
        self._context = uc.context_save()  # one buffer, reused for every save / restore
        self._size = self._context._size  # type: ignore[attr-defined]
        self._data = bytearray()

    def layout_ok(self) -> bool:
        """The offsets above match this engine (checked against uc_reg_read, on a fresh engine)."""
        if self._size != _CONTEXT_BYTES:
            return False
        self.load()
        uc = self._uc
        gdt = uc.reg_read(x86.UC_X86_REG_GDTR)
        return (
            self._u64(0) == uc.reg_read(self.regs.ax)
            and self._u64(8 * 4) == uc.reg_read(self.regs.sp)
            and self._u64(_EIP) == uc.reg_read(self.regs.ip)
            and self._u64(_CR) == uc.reg_read(x86.UC_X86_REG_CR0)
            and self._u64(_CR + 8 * 3) == uc.reg_read(x86.UC_X86_REG_CR3)
            and self.segment(R_CS).selector == uc.reg_read(x86.UC_X86_REG_CS)
            and self.table("gdt").base == gdt[1]
            and self.table("idt").limit == uc.reg_read(x86.UC_X86_REG_IDTR)[2]
            and self.table("tr").limit == uc.reg_read(x86.UC_X86_REG_TR)[2]
            and self._i32(_OLD_EXCEPTION) == -1
        )

    # --- the copy ------------------------------------------------------------------------------

    def load(self) -> None:
        """Copy the engine's state into the buffer (uc_context_save)."""
        uc = self._uc
        uclib.uc_context_save(uc._uch, self._context.context)
        self._data = bytearray(ctypes.string_at(self._address(), self._size - _DATA))

    def store(self) -> None:
        """Copy the buffer back into the engine (uc_context_restore)."""
        ctypes.memmove(self._address(), bytes(self._data), len(self._data))
        uclib.uc_context_restore(self._uc._uch, self._context.context)

    def _address(self) -> int:
        base = ctypes.cast(self._context.context, ctypes.c_void_p).value
        assert base is not None
        return base + _DATA

    def _u64(self, offset: int) -> int:
        return struct.unpack_from("<Q", self._data, offset)[0]

    def _i32(self, offset: int) -> int:
        return struct.unpack_from("<i", self._data, offset)[0]

    def _u32(self, offset: int) -> int:
        return struct.unpack_from("<I", self._data, offset)[0]

    # --- fields (of the buffer: load() first, store() after changing) ----------------------------

    @property
    def hflags(self) -> int:
        return self._u32(_HFLAGS)

    @hflags.setter
    def hflags(self, value: int) -> None:
        struct.pack_into("<I", self._data, _HFLAGS, value)

    @property
    def hflags2(self) -> int:
        return self._u32(_HFLAGS + 4)

    @hflags2.setter
    def hflags2(self, value: int) -> None:
        struct.pack_into("<I", self._data, _HFLAGS + 4, value)

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL_MASK

    @property
    def error_code(self) -> int:
        return self._u32(_ERROR_CODE)

    @property
    def exception_is_int(self) -> bool:
        return self._i32(_EXCEPTION_IS_INT) != 0

    @property
    def ip(self) -> int:
        return self._u64(_EIP)

    @ip.setter
    def ip(self, value: int) -> None:
        struct.pack_into("<Q", self._data, _EIP, value)

    @property
    def sp(self) -> int:
        return self._u64(8 * 4)  # regs[R_ESP]

    def gprs(self) -> tuple[int, ...]:
        """regs[0..15] (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15: QEMU's R_* order), all 64 bits."""
        return struct.unpack_from("<16Q", self._data, 0)

    def set_gprs(self, values: tuple[int, ...] | list[int]) -> None:
        struct.pack_into("<16Q", self._data, 0, *values)

    def cr(self, n: int) -> int:
        return self._u64(_CR + 8 * n)

    def table(self, which: str) -> SegmentCache:
        """The "tr", "ldt", "gdt" or "idt" register (SegmentCache: only base and limit for the tables)."""
        offset = {"tr": _TR, "ldt": _LDT, "gdt": _GDT, "idt": _IDT}[which]
        selector, base, limit, flags = struct.unpack_from("<I4xQII", self._data, offset)
        return SegmentCache(selector, base, limit, flags)

    def set_table(self, which: str, seg: SegmentCache) -> None:
        """Write the "tr", "ldt", "gdt" or "idt" register as it is (no descriptor is read)."""
        offset = {"tr": _TR, "ldt": _LDT, "gdt": _GDT, "idt": _IDT}[which]
        struct.pack_into("<I4xQII", self._data, offset, seg.selector, seg.base, seg.limit, seg.flags)

    def set_segment(self, index: int, seg: SegmentCache) -> None:
        """Write segs[index] as it is, hflags untouched (special_registers.py derives them once all
        six are written)."""
        struct.pack_into(
            "<I4xQII",
            self._data,
            _SEGS + index * _SEGMENT_BYTES,
            seg.selector,
            seg.base,
            seg.limit,
            seg.flags,
        )

    def set_gpr(self, index: int, value: int) -> None:
        """regs[index] (R_EAX 0, R_ECX 1, R_EDX 2, R_EBX 3, ...), all 64 bits: what a 32-bit
        engine's uc_reg_write cannot reach once the guest is in long mode."""
        struct.pack_into("<Q", self._data, 8 * index, value & 0xFFFFFFFFFFFFFFFF)

    def set_ip(self, value: int) -> None:
        """env->eip, all 64 bits (a 32-bit engine's uc_reg_write of EIP cannot set a long-mode RIP)."""
        struct.pack_into("<Q", self._data, _EIP, value & 0xFFFFFFFFFFFFFFFF)

    def clear_old_exception(self) -> None:
        """x86_cpu_do_interrupt's "successfully delivered": no exception in flight.

        exception_is_int is cleared too: Unicorn's cpu_handle_exception moves EIP to
        exception_next_eip for any exception while it is set, and the MSR intercept's exit
        (msr_intercept.py), which does not go through raise_interrupt2, would inherit the last
        INT n's value and lose the RDMSR / WRMSR address."""
        struct.pack_into("<i", self._data, _OLD_EXCEPTION, -1)
        struct.pack_into("<i", self._data, _EXCEPTION_IS_INT, 0)

    def intercept_msrs(self, vmcb: int, intercept: int) -> None:
        """SVM guest mode with only the MSR intercept on (msr_intercept.py): HF_GUEST_MASK in
        hflags, env->vm_vmcb and env->intercept."""
        struct.pack_into("<Q", self._data, _VM_VMCB, vmcb)
        struct.pack_into("<Q", self._data, _INTERCEPT, intercept)
        self.hflags = self.hflags | HF_GUEST_MASK

    def segment(self, index: int) -> SegmentCache:
        at = _SEGS + index * _SEGMENT_BYTES
        selector, base, limit, flags = struct.unpack_from("<I4xQII", self._data, at)
        return SegmentCache(selector, base, limit, flags)

    def load_segment_cache(self, index: int, seg: SegmentCache) -> None:
        """cpu_x86_load_seg_cache: the segment, and the hflags that follow from CS and SS."""
        self.set_segment(index, seg)
        hflags = self.hflags
        if index == R_CS:
            if hflags & HF_LMA_MASK and seg.flags & DESC_L_MASK:
                hflags |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK
            else:
                hflags &= ~(HF_CS32_MASK | HF_CS64_MASK)
                if seg.flags & DESC_B_MASK:
                    hflags |= HF_CS32_MASK
        elif index == R_SS:
            hflags = (hflags & ~HF_CPL_MASK) | seg.dpl
            if not hflags & HF_CS64_MASK:
                hflags &= ~HF_SS32_MASK
                if seg.flags & DESC_B_MASK:
                    hflags |= HF_SS32_MASK
        self.hflags = hflags
