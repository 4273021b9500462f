"""The model vCPU's CPUID: KVM_GET_SUPPORTED_CPUID's table, and the guest's answers from the table
KVM_SET_CPUID2 gave, with KVM's lookup rules (kvm_cpuid in arch/x86/kvm/cpuid.c).

What the model offers (`supported_cpuid`) is what its engine executes, nothing more: the leaves
of the engine's own CPU model (cpu.ENGINE_CPU_MODEL, whose feature words Unicorn's cpu.c has
already cut down to what TCG implements, and which translate.c checks before it decodes an
instruction), read from a scratch engine, then
- without the features whose MSRs or state the model does not implement: MCE / MCA (no
  machine-check banks), the PMU (leaf 0xa), x2APIC and the TSC-deadline timer (the local APIC
  model adds them where it implements them: `LAPIC_FEATURES`), AVX's XSAVE component (TCG has
  no AVX: XCR0 may hold x87 and SSE only);
- with what KVM adds: the hypervisor bit, invariant TSC (0x80000007 EDX[8]: the model's TSC is
  the host's monotonic clock scaled, tsc.py), and the KVM leaves 0x40000000 ("KVMKVMKVM\\0\\0\\0",
  highest leaf 0x40000001) and 0x40000001 (kvmclock, NOP_IO_DELAY, the stable-clock bit: what
  kvmclock.py implements).
tests/model/test_cpuid.py runs one instruction of every offered feature on the model, and one of
features left out to show the engine refuses them.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as x86

from pcihole.hv import uapi
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.msr_index import MSR_IA32_APICBASE_ENABLE

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic: <asm/kvm.h>)
#: Leaves whose ECX selects a subleaf (cpuid_function_is_indexed in cpuid.c).
INDEXED_LEAVES = frozenset({4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x8000001D})

KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
# arch/x86/include/uapi/asm/kvm_para.h
KVM_FEATURE_CLOCKSOURCE = 0
KVM_FEATURE_NOP_IO_DELAY = 1
KVM_FEATURE_CLOCKSOURCE2 = 3
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 24
#: The paravirtual features the model implements (kvmclock.py; NOP_IO_DELAY needs nothing: it
#: tells Linux that port 0x80 delays are not needed).
MODEL_KVM_FEATURES = (
    1 << KVM_FEATURE_CLOCKSOURCE
    | 1 << KVM_FEATURE_NOP_IO_DELAY
    | 1 << KVM_FEATURE_CLOCKSOURCE2
    | 1 << KVM_FEATURE_CLOCKSOURCE_STABLE_BIT
)

# Feature bits (arch/x86/include/asm/cpufeatures.h) the model adjusts.
CPUID_1_EDX_MCE = 1 << 7
CPUID_1_EDX_APIC = 1 << 9
CPUID_1_EDX_MCA = 1 << 14
CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_OSXSAVE = 1 << 27
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_80000007_EDX_INVTSC = 1 << 8
XFEATURE_MASK_FPSSE = 0x3  # x87 and SSE: the XSAVE components TCG implements
XSAVE_LEGACY_AND_HEADER = 512 + 64
X86_CR4_OSXSAVE = 1 << 18

#: Leaf 1 ECX bits the local APIC model implements (lapic.py): the x2APIC MSRs and the TSC-deadline
#: timer. A VM without KVM_CREATE_IRQCHIP has no LAPIC, as on KVM, which offers them all the same.
LAPIC_FEATURES = CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE

_BASIC_MAX = 0xD  # the Broadwell model's highest basic leaf
_EXTENDED = (0x80000000, 0x80000001, 0x80000002, 0x80000003, 0x80000004, 0x80000005, 0x80000006,
             0x80000007, 0x80000008)  # fmt: skip


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @property
    def regs(self) -> tuple[int, int, int, int]:
        return self.eax, self.ebx, self.ecx, self.edx


class CpuidTable:
    """The entries of one KVM_SET_CPUID2, answered as kvm_cpuid does."""

    def __init__(self, entries: list[CpuidEntry]) -> None:
        self.entries = entries

    @classmethod
    def from_cpuid2(cls, cpuid: ctypes.Structure) -> CpuidTable:
        """The table of a KVM_SET_CPUID2 argument; E2BIG beyond KVM_MAX_CPUID_ENTRIES, as
        kvm_vcpu_ioctl_set_cpuid2 refuses it before reading the entries."""
        if cpuid.nent > uapi.KVM_MAX_CPUID_ENTRIES:
            raise ModelKvmError(errno.E2BIG, "KVM_SET_CPUID2", f"nent={cpuid.nent}")
        return cls(
            [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cpuid.entries[i] for i in range(cpuid.nent))
            ]
        )

    def find(self, function: int, index: int | None) -> CpuidEntry | None:
        """cpuid_entry2_find: the first entry of `function` whose index matches where it is
        significant (index None: the first entry of `function`, kvm_find_cpuid_entry)."""
        for e in self.entries:
            if e.function != function:
                continue
            if index is None or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX or e.index == index:
                return e
        return None

    def _out_of_range(self, function: int, index: int) -> tuple[int, CpuidEntry | None]:
        """get_out_of_range_cpuid_entry: on Intel, a leaf above its class's highest is answered as
        the highest basic leaf (with the original index); on AMD / Hygon, zeros."""
        basic = self.find(0, None)
        if basic is None:
            return function, None
        vendor = struct.pack("<III", basic.ebx, basic.edx, basic.ecx)
        if vendor in (b"AuthenticAMD", b"HygonGenuine"):
            return function, None
        if 0x40000000 <= function <= 0x4FFFFFFF:
            cls = self.find(function & 0xFFFFFF00, None)
        elif function >= 0xC0000000:
            cls = self.find(0xC0000000, None)
        else:
            cls = self.find(function & 0x80000000, None)
        if cls is not None and function <= cls.eax:
            return function, None
        return basic.eax, self.find(basic.eax, index)

    def lookup(
        self,
        function: int,
        index: int,
        runtime: Callable[[CpuidEntry], tuple[int, int, int, int]] | None = None,
    ) -> tuple[int, int, int, int]:
        """kvm_cpuid(exact_only=false): EAX, EBX, ECX, EDX for CPUID(function, index). `runtime`
        gives the answering entry's registers as kvm_update_cpuid_runtime left them: it edits the
        entries themselves, so an out-of-range leaf answered by leaf 1 sees its edits too, and a
        table without leaf 1 has nothing to edit."""
        entry = self.find(function, index)
        if entry is None:
            function, entry = self._out_of_range(function, index)
        if entry is not None:
            return entry.regs if runtime is None else runtime(entry)
        if function in (0xB, 0x1F):
            # CL passes through and EDX is the x2APIC ID even for undefined subleaves, where the
            # leaf exists (subleaf 1 does).
            one = self.find(function, 1)
            if one is not None:
                return 0, 0, index & 0xFF, one.edx
        return 0, 0, 0, 0


def runtime_adjust(
    function: int, regs: tuple[int, int, int, int], cr4: int, apic_base: int
) -> tuple[int, int, int, int]:
    """kvm_update_cpuid_runtime: leaf 1's OSXSAVE follows CR4.OSXSAVE and APIC follows
    IA32_APIC_BASE's enable bit."""
    if function != 1:
        return regs
    eax, ebx, ecx, edx = regs
    ecx = ecx | CPUID_1_ECX_OSXSAVE if cr4 & X86_CR4_OSXSAVE else ecx & ~CPUID_1_ECX_OSXSAVE
    edx = edx | CPUID_1_EDX_APIC if apic_base & MSR_IA32_APICBASE_ENABLE else edx & ~CPUID_1_EDX_APIC
    return eax, ebx, ecx, edx


# --- what the model offers -----------------------------------------------------------------------------


def _engine_cpuid() -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """CPUID of a scratch engine of the model's CPU model: every leaf and the subleaves that exist."""
    from pcihole.hv.model.cpu import ENGINE_CPU_MODEL  # cpu.py imports nothing of this module

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(ENGINE_CPU_MODEL)
    code = 0x1000
    uc.mem_map(code, 0x1000, UC_PROT_ALL)
    uc.mem_write(code, b"\x0f\xa2")  # cpuid

    def cpuid(function: int, index: int) -> tuple[int, int, int, int]:
        uc.reg_write(x86.UC_X86_REG_RAX, function)
        uc.reg_write(x86.UC_X86_REG_RCX, index)
        uc.emu_start(code, code + 2)
        return tuple(uc.reg_read(r) for r in (x86.UC_X86_REG_EAX, x86.UC_X86_REG_EBX,
                                              x86.UC_X86_REG_ECX, x86.UC_X86_REG_EDX))  # type: ignore[return-value]  # fmt: skip

    out: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for function in (*range(_BASIC_MAX + 1), *_EXTENDED):
        if function == 4:  # deterministic cache parameters: until the type field says "none"
            for index in range(8):
                out[(4, index)] = regs = cpuid(4, index)
                if regs[0] & 0x1F == 0:
                    break
        elif function == 0xB:  # topology: SMT and core levels, then an invalid one
            for index in range(3):
                out[(0xB, index)] = cpuid(0xB, index)
        elif function == 0xD:
            for index in range(2):
                out[(0xD, index)] = cpuid(0xD, index)
        elif function == 7:
            out[(7, 0)] = cpuid(7, 0)
        else:
            out[(function, 0)] = cpuid(function, 0)
    uc.mem_unmap(code, 0x1000)
    return out


@functools.cache
def supported_entries() -> tuple[CpuidEntry, ...]:
    """KVM_GET_SUPPORTED_CPUID of the model (see the module docstring)."""
    raw = _engine_cpuid()
    entries: list[CpuidEntry] = []
    for (function, index), (eax, ebx, ecx, edx) in raw.items():
        if function == 1:
            ebx &= 0x0000FFFF  # the APIC ID and logical count are the VMM's (cpu_setup.normalise_cpuid)
            edx &= ~(CPUID_1_EDX_MCE | CPUID_1_EDX_MCA)
            ecx &= ~(CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE | CPUID_1_ECX_OSXSAVE)
            ecx |= LAPIC_FEATURES | CPUID_1_ECX_HYPERVISOR
        elif function == 0xA:
            eax = ebx = ecx = edx = 0  # no PMU
        elif function == 0xD and index == 0:
            eax, edx = eax & XFEATURE_MASK_FPSSE, 0
            ebx = ecx = XSAVE_LEGACY_AND_HEADER
        elif function == 0xD and index == 1:
            eax &= 1  # XSAVEOPT only (no XSAVEC / XGETBV1 / XSAVES: no components beyond SSE)
            ebx = ecx = edx = 0
        elif function == 0x80000007:
            edx |= CPUID_80000007_EDX_INVTSC
        flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX if function in INDEXED_LEAVES else 0
        entries.append(CpuidEntry(function, index, flags, eax, ebx, ecx, edx))
    sig = struct.unpack("<III", KVM_SIGNATURE)
    entries.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, *sig))
    entries.append(CpuidEntry(KVM_CPUID_FEATURES, 0, 0, MODEL_KVM_FEATURES, 0, 0, 0))
    return tuple(entries)


def supported_cpuid() -> ctypes.Structure:
    """The model's KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 (uapi.cpuid2_with)."""
    return cpuid2_from(supported_entries())


def cpuid2_from(entries: Sequence[CpuidEntry]) -> ctypes.Structure:
    """`entries` as the kvm_cpuid2 KVM_SET_CPUID2 takes."""
    out = uapi.cpuid2_with(len(entries))()
    out.nent = len(entries)
    for i, e in enumerate(entries):
        out.entries[i] = uapi.kvm_cpuid_entry2(
            function=e.function, index=e.index, flags=e.flags, eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx
        )
    return out
