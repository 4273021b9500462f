"""`MsrIntercept`: how guest RDMSR / WRMSR (and HLT) reach Python, through the engine's own SVM intercepts.

Unicorn 2.1.4 has no instruction hook for RDMSR / WRMSR (x86_insn_hook_validate accepts IN, OUT,
SYSCALL, SYSENTER, CPUID, RDTSC, RDTSCP only), and its helper_rdmsr / helper_wrmsr answer an MSR
they do not know with 0 and drop the write, where KVM injects #GP. What the engine does keep is
QEMU's nested-SVM intercept check, which both helpers call first:

    cpu_svm_check_intercept_param(env, SVM_EXIT_MSR, is_write, GETPC())   (svm_helper.c)

With HF_GUEST_MASK in hflags and the SVM_EXIT_MSR bit in env->intercept, it reads the MSR
permission map (two bits per MSR, read and write, at the physical address the VMCB's
control.msrpm_base_pa holds) and, for a set bit or an MSR outside the map's three ranges
(0-0x1fff, 0xc0000000-0xc0001fff, 0xc0010000-0xc0011fff), calls cpu_vmexit: the instruction is
abandoned with EIP on it, error_code = is_write, and cpu_handle_exception hands exception
EXCP_VMEXIT + SVM_EXIT_MSR (0x17c) to the UC_HOOK_INTR hook. intercept_exits.py then does the
access through the vCPU's MsrTable and moves RIP past the 2-byte instruction, or delivers #GP(0).

HLT is intercepted too (SVM_EXIT_HLT): helper_hlt calls cpu_svm_check_intercept_param(env,
SVM_EXIT_HLT, 0, GETPC()) before it halts, so the UC_HOOK_INTR hook sees exception 0x178 with EIP
on the HLT, and the vCPU sleeps inside that hook until an interrupt (intercept_exits.py steps over
the HLT, pending_events.py sleeps) instead of letting the engine halt: an engine that halts returns
from uc_emu_start, and every return flushes the translation cache.
Nothing else is intercepted: every other intercept word stays 0, so CPUID, I/O, CR accesses and
exceptions behave as before (their checks return at once). The VMCB and the permission map are
host pages mapped at INTERCEPT_BASE, above the guest-physical space the model gives guests
(PHYS_LIMIT) and above the CPU's physical-address width, so no guest mapping can reach them.

MSRs the engine implements as KVM does (EFER, STAR, LSTAR, FS / GS base, PAT reads, MTRRs, ...)
have their bits clear: the engine does them with no Python call. Python reaches those through
uc.msr_read / uc.msr_write, which call the same helpers; `native()` points the VMCB at an
all-zero map for the duration, so that they are not intercepted from outside the engine.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from unicorn import UC_PROT_READ, Uc

from pcihole.hv.model.engine_state import EngineState
from pcihole.hv.model.guest_memory import PHYS_LIMIT

PAGE = 0x1000
INTERCEPT_BASE = PHYS_LIMIT
# SVM exit codes (target/i386/svm.h) and QEMU's exception number for a VMEXIT (cpu.h EXCP_VMEXIT).
SVM_EXIT_INTR = 0x060
SVM_EXIT_HLT = 0x078
SVM_EXIT_MSR = 0x07C
EXCP_VMEXIT = 0x100
#: The exception number UC_HOOK_INTR sees for an intercepted RDMSR / WRMSR.
MSR_EXIT = EXCP_VMEXIT + SVM_EXIT_MSR
#: The exception number UC_HOOK_INTR sees for an intercepted HLT.
HLT_EXIT = EXCP_VMEXIT + SVM_EXIT_HLT
MSR_INTERCEPT = 1 << (SVM_EXIT_MSR - SVM_EXIT_INTR)
HLT_INTERCEPT = 1 << (SVM_EXIT_HLT - SVM_EXIT_INTR)
#: offsetof(struct vmcb, control.msrpm_base_pa) (AMD APM Vol. 2 Table B-1; svm.h vmcb_control_area).
VMCB_MSRPM_BASE_PA = 0x48
MSRPM_BYTES = 2 * PAGE  # 3 ranges x 0x2000 MSRs x 2 bits = 6 KiB, in two pages
_VMCB = 0
_MAP = PAGE  # the permission map the guest runs with
_ZEROS = 3 * PAGE  # an all-clear map: nothing intercepted (native())
_BYTES = 5 * PAGE
# The map's three ranges: (first MSR, bit offset of its read bit).
_RANGES = ((0, 0), (0xC0000000, 8192 * 2), (0xC0010000, 16384 * 2))
_RANGE_MSRS = 0x2000


def msrpm_bit(index: int, write: bool) -> int | None:
    """The bit of MSR `index` in the permission map (the read bit; +1 for write), or None where the
    map does not cover it (always intercepted): cpu_svm_check_intercept_param's t0 / t1."""
    for first, bit in _RANGES:
        if first <= index < first + _RANGE_MSRS:
            return bit + (index - first) * 2 + int(write)
    return None


class MsrIntercept:
    """One vCPU's VMCB and MSR permission map (host pages), installed in each of its engines."""

    def __init__(self) -> None:
        self._buf = mmap.mmap(-1, _BYTES)
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        self._buf[_MAP : _MAP + MSRPM_BYTES] = b"\xff" * MSRPM_BYTES  # intercept every MSR ...
        self._point_at(_MAP)

    def _point_at(self, offset: int) -> None:
        struct.pack_into("<Q", self._buf, _VMCB + VMCB_MSRPM_BASE_PA, INTERCEPT_BASE + offset)

    def pass_through(self, msrs: Iterable[tuple[int, bool]]) -> None:
        """... but these (index, write) accesses, which the engine does itself."""
        for index, write in msrs:
            bit = msrpm_bit(index, write)
            if bit is None:
                raise ValueError(f"MSR {index:#x} is outside the SVM permission map: always intercepted")
            self._buf[_MAP + bit // 8] &= ~(1 << (bit % 8)) & 0xFF

    def intercepted(self, index: int, write: bool) -> bool:
        bit = msrpm_bit(index, write)
        return bit is None or bool(self._buf[_MAP + bit // 8] & (1 << (bit % 8)))

    def install(self, uc: Uc, state: EngineState) -> None:
        """Map the pages into a new engine and turn the intercept on (HF_GUEST_MASK, intercept)."""
        uc.mem_map_ptr(INTERCEPT_BASE, _BYTES, UC_PROT_READ, self._addr)
        state.load()
        state.intercept_msrs(INTERCEPT_BASE + _VMCB, MSR_INTERCEPT | HLT_INTERCEPT)
        state.store()

    @contextmanager
    def native(self) -> Iterator[None]:
        """uc.msr_read / uc.msr_write from Python reach the engine's helpers, not the intercept."""
        self._point_at(_ZEROS)
        try:
            yield
        finally:
            self._point_at(_MAP)
