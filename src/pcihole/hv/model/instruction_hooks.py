"""`InstructionHooks`: CPUID, RDTSC and RDTSCP answered by the vCPU instead of the engine.

KVM answers a guest's CPUID from the table userspace set (kvm_emulate_cpuid -> kvm_cpuid) and its
RDTSC from the guest's TSC (the host's, scaled and offset). Unicorn's engine would answer CPUID
from its own CPU model and RDTSC / RDTSCP with the host's raw TSC, so each engine gets instruction
hooks that answer from the vCPU's CpuidTable (cpuid.py) and TscClock (tsc.py) and skip the
engine's own work. The Python binding offers such a hook (one whose non-zero return skips the
instruction) for CPUID only; the RDTSC / RDTSCP ones are added through libunicorn with the same C
type. They run at every RDTSC and CPUID, hence FastRegisters (fast_registers.py).

write_gprs writes an instruction's result registers as the CPU does, all 64 bits: RDMSR's result
(intercept_exits.py) goes through it too.
"""

from __future__ import annotations

import ctypes
import weakref

from unicorn import UC_HOOK_INSN, Uc, UcError
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib
from unicorn.x86_const import (
    UC_X86_INS_CPUID,
    UC_X86_INS_RDTSC,
    UC_X86_INS_RDTSCP,
    UC_X86_REG_CR4,
    UC_X86_REG_EAX,
    UC_X86_REG_EBX,
    UC_X86_REG_ECX,
    UC_X86_REG_EDX,
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
)

from pcihole.hv.model import cpu
from pcihole.hv.model.cpu_msrs import MSR_IA32_APICBASE, EngineMsrs
from pcihole.hv.model.cpuid import CpuidEntry, CpuidTable, runtime_adjust
from pcihole.hv.model.engine_state import REGS_32, EngineState
from pcihole.hv.model.fast_registers import FastRegisters
from pcihole.hv.model.msr import MsrTable
from pcihole.hv.model.tsc import TscClock

# QEMU's regs[] indices (R_EAX, R_ECX, R_EDX, R_EBX) and the 64-bit / 32-bit Unicorn ids of each.
R_EAX, R_ECX, R_EDX, R_EBX = 0, 1, 2, 3
_GPR_IDS_64 = {R_EAX: UC_X86_REG_RAX, R_ECX: UC_X86_REG_RCX, R_EDX: UC_X86_REG_RDX, R_EBX: UC_X86_REG_RBX}
_GPR_IDS_32 = {R_EAX: UC_X86_REG_EAX, R_ECX: UC_X86_REG_ECX, R_EDX: UC_X86_REG_EDX, R_EBX: UC_X86_REG_EBX}
# uc_cb_insn_cpuid_t, which Unicorn's RDTSC / RDTSCP hooks also take (the Python binding offers
# them for CPUID only): int (*)(uc_engine *, void *user_data); non-zero skips the instruction's own work.
_INSN_SKIP_CFUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class InstructionHooks:
    """One vCPU's CPUID / RDTSC / RDTSCP hooks, installed in each of its engines."""

    def __init__(self, msrs: MsrTable, tsc: TscClock, engine_msrs: EngineMsrs) -> None:
        self.msrs = msrs  # APIC_BASE, which CPUID leaf 1 reflects
        self.tsc = tsc
        self.engine_msrs = engine_msrs  # TSC_AUX, which RDTSCP returns
        # KVM_SET_CPUID2's table (cpuid.py), answered by the CPUID hook of each engine. Before the
        # first KVM_SET_CPUID2 the vCPU has no entries, and kvm_cpuid answers every leaf with
        # zeros (no entry, no leaf 0 for get_out_of_range_cpuid_entry to go by): never the
        # engine's own CPU model.
        self._cpuid = CpuidTable([])
        self._cpuid_engine: Uc | None = None  # the engine the CPUID hook is installed in
        self._fast: FastRegisters | None = None  # of the current engine (_hook_tsc)
        # The ctypes thunks of each engine's RDTSC / RDTSCP hooks, alive exactly as long as their
        # engine, as the binding keeps its own hooks' thunks in the Uc (its _callbacks): the vCPU
        # replaces its engine at every mode switch, and an old engine's thunks go when it does (a
        # thunk freed before its engine would leave the engine a dangling callback).
        self._insn_thunks: weakref.WeakKeyDictionary[Uc, list[object]] = weakref.WeakKeyDictionary()
        # The current engine's mode and, where the engine's state is in reach, that state (write_gprs).
        self._mode: cpu.CpuMode | None = None
        self._msr_state: EngineState | None = None

    def install(self, uc: Uc, mode: cpu.CpuMode, msr_state: EngineState | None) -> None:
        """Hook the vCPU's new engine `uc`, in `mode`; `msr_state` is its state, where in reach."""
        self._mode, self._msr_state = mode, msr_state
        self._hook_tsc(uc)
        self._hook_cpuid(uc)

    @property
    def cpuid(self) -> CpuidTable:
        """The guest's CPUID table (empty before KVM_SET_CPUID2)."""
        return self._cpuid

    def set_cpuid(self, table: CpuidTable, uc: Uc | None) -> None:
        """KVM_SET_CPUID2's `table` answers CPUID from now on, in the live engine `uc` too."""
        self._cpuid = table
        if uc is not None:
            self._hook_cpuid(uc)

    def _hook_cpuid(self, uc: Uc) -> None:
        if self._cpuid_engine is not uc:
            uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, UC_X86_INS_CPUID)
            self._cpuid_engine = uc

    def write_gprs(self, uc: Uc, values: dict[int, int], ip: int | None = None) -> None:
        """Set RAX / RCX / RDX / RBX (QEMU's indices) as an instruction's result: all 64 bits (the
        upper halves cleared, as CPUID, RDTSC and RDMSR do in 64-bit mode). A 32-bit engine that
        followed the guest into long mode reaches only the low halves with uc_reg_write, so there
        the engine's state is written instead."""
        fast = self._fast
        if self._mode is cpu.CpuMode.LONG_64 and fast is not None:
            for index, value in values.items():
                fast.write(_GPR_IDS_64[index], value)
            if ip is not None:
                uc.reg_write(UC_X86_REG_RIP, ip)  # through the binding: leaves the block
            return
        state = self._msr_state
        if state is None:
            for index, value in values.items():
                uc.reg_write(_GPR_IDS_32[index], value & 0xFFFFFFFF)
            if ip is not None:
                uc.reg_write(REGS_32.ip, ip & 0xFFFFFFFF)
            return
        state.load()
        for index, value in values.items():
            state.set_gpr(index, value)
        if ip is not None:
            state.set_ip(ip)
        state.store()

    def _on_cpuid(self, uc: Uc, _data: object) -> int:
        """CPUID from KVM_SET_CPUID2's table (kvm_emulate_cpuid -> kvm_cpuid); 1 skips the engine's."""
        fast = self._fast
        assert fast is not None
        function = fast.read(UC_X86_REG_EAX) & 0xFFFFFFFF
        index = fast.read(UC_X86_REG_ECX) & 0xFFFFFFFF

        def runtime(entry: CpuidEntry) -> tuple[int, int, int, int]:
            if entry.function != 1:
                return entry.regs
            apic_base = self.msrs.read(MSR_IA32_APICBASE, host=True)
            return runtime_adjust(1, entry.regs, fast.read(UC_X86_REG_CR4), apic_base)

        eax, ebx, ecx, edx = self._cpuid.lookup(function, index, runtime)
        self.write_gprs(uc, {R_EAX: eax, R_EBX: ebx, R_ECX: ecx, R_EDX: edx})
        return 1

    def _hook_tsc(self, uc: Uc) -> None:
        """RDTSC / RDTSCP read self.tsc (the engine's own would return the host's raw TSC). Also
        gives the engine the register access these hooks and the CPUID hook use."""
        self._fast = FastRegisters(uc)
        thunks = self._insn_thunks.setdefault(uc, [])
        # The engine through a weak reference: a strong one from its own thunks would keep the
        # engine (their key in _insn_thunks) alive for good. It is alive whenever it calls them.
        engine = weakref.ref(uc)
        for insn, callback in ((UC_X86_INS_RDTSC, self._on_rdtsc), (UC_X86_INS_RDTSCP, self._on_rdtscp)):
            thunk = _INSN_SKIP_CFUNC(lambda _uch, _data, cb=callback: cb(engine()))
            thunks.append(thunk)
            handle = uc_hook_h()
            # The thunk itself as the void * argument, as the binding's hook_add passes its own:
            # ctypes.cast(thunk, c_void_p) would store the thunk in its own _objects, a cycle the
            # collector never frees (measured: every engine's thunks outlived it).
            err = uclib.uc_hook_add(
                uc._uch, ctypes.byref(handle), UC_HOOK_INSN, thunk, None,
                ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn),
            )  # fmt: skip
            if err:
                raise UcError(err)

    def _on_rdtsc(self, uc: Uc) -> int:
        tsc = self.tsc.read()
        self.write_gprs(uc, {R_EAX: tsc & 0xFFFFFFFF, R_EDX: tsc >> 32})
        return 1

    def _on_rdtscp(self, uc: Uc) -> int:
        tsc = self.tsc.read()
        tsc_aux = self.engine_msrs.tsc_aux
        aux = tsc_aux.value & 0xFFFFFFFF if tsc_aux is not None else 0
        self.write_gprs(uc, {R_EAX: tsc & 0xFFFFFFFF, R_EDX: tsc >> 32, R_ECX: aux})
        return 1
