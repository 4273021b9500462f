"""A vCPU set up the way QEMU and Firecracker set one up for an x86 guest OS, through KVM's vCPU
ioctls: the same calls on either backend (the model answers them as KVM does).

What each step matches:

- CPUID: KVM_GET_SUPPORTED_CPUID, then normalised as Firecracker's cpuid/normalize.rs and kvmtool's
  x86/cpuid.c do: leaf 1 carries the vCPU's APIC id in EBX[31:24] and one logical processor, and
  the hypervisor bit (ECX[31]) that makes Linux look at leaf 0x40000000 ("KVMKVMKVM\\0\\0\\0": the
  KVM paravirtual leaves, kvm-clock among them, which KVM_GET_SUPPORTED_CPUID already lists,
  arch/x86/kvm/cpuid.c __do_cpuid_func case KVM_CPUID_SIGNATURE / KVM_CPUID_FEATURES).
  Features a host cannot run (machine/host_quirks.py) are cleared by name.
- MSRs: Firecracker's arch/x86_64/msr.rs create_boot_msr_entries: SYSENTER/SYSCALL MSRs zero, the
  TSC zero, IA32_MISC_ENABLE fast strings, MTRRdefType enabled with write-back default.
- FPU: Firecracker's regs.rs setup_fpu: FCW 0x37f, MXCSR 0x1f80 (the power-on values).
- LAPIC: Firecracker's interrupts.rs set_lint and kvmtool's kvm_cpu__set_lint: LINT0 ExtINT (the
  8259's output), LINT1 NMI, as a PC's BIOS leaves them (MP spec "virtual wire" mode).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable

from pcihole.hv import uapi
from pcihole.hv.msr_index import (
    MSR_CSTAR,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_TSC,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_MTRR_DEF_TYPE,
    MSR_STAR,
    MSR_SYSCALL_MASK,
)

# --- CPUID --------------------------------------------------------------------------------------------

EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"
#: Feature name (as in /proc/cpuinfo and Linux's clearcpuid=) -> (leaf, subleaf, register, bit):
#: arch/x86/include/asm/cpufeatures.h.
CPUID_FEATURES: dict[str, tuple[int, int, str, int]] = {
    "cx16": (1, 0, ECX, 13),
    "pcid": (1, 0, ECX, 17),
    "popcnt": (1, 0, ECX, 23),
    "xsave": (1, 0, ECX, 26),
    "osxsave": (1, 0, ECX, 27),
    "avx": (1, 0, ECX, 28),
    "f16c": (1, 0, ECX, 29),
    "rdrand": (1, 0, ECX, 30),
    "fsgsbase": (7, 0, EBX, 0),
    "avx2": (7, 0, EBX, 5),
    "invpcid": (7, 0, EBX, 10),
    "avx512f": (7, 0, EBX, 16),
    "avx512dq": (7, 0, EBX, 17),
    "rdseed": (7, 0, EBX, 18),
    "smap": (7, 0, EBX, 20),
    "avx512ifma": (7, 0, EBX, 21),
    "avx512cd": (7, 0, EBX, 28),
    "avx512bw": (7, 0, EBX, 30),
    "avx512vl": (7, 0, EBX, 31),
    "rdpid": (7, 0, ECX, 22),
    "rdtscp": (0x80000001, 0, EDX, 27),
}
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EBX_APIC_ID_SHIFT = 24
CPUID_1_EBX_LOGICAL_COUNT_SHIFT = 16
CPUID_1_EDX_HTT = 1 << 28
KVM_CPUID_SIGNATURE = 0x40000000
#: Leaf 0xd describes XSAVE state; with xsave hidden it must describe none (Linux reads it only when
#: XSAVE is set, but a consistent table costs nothing).
CPUID_XSAVE_LEAF = 0xD


class UnknownCpuFeature(ValueError):
    pass


def normalise_cpuid(
    supported: ctypes.Structure, *, vcpu_id: int, hide: Iterable[str] = ()
) -> ctypes.Structure:
    """A copy of KVM_GET_SUPPORTED_CPUID's table for vCPU `vcpu_id`, without the features in `hide`."""
    hidden = []
    for name in hide:
        if name not in CPUID_FEATURES:
            raise UnknownCpuFeature(
                f"unknown CPU feature {name!r} (known: {', '.join(sorted(CPUID_FEATURES))})"
            )
        hidden.append(CPUID_FEATURES[name])
    out = uapi.cpuid2_with(supported.nent)()
    out.nent = supported.nent
    ctypes.memmove(out.entries, supported.entries, ctypes.sizeof(uapi.kvm_cpuid_entry2) * supported.nent)
    for i in range(out.nent):
        e = out.entries[i]
        if e.function == 1:
            e.ebx = (
                (e.ebx & 0x0000FFFF)
                | (vcpu_id << CPUID_1_EBX_APIC_ID_SHIFT)
                | (1 << CPUID_1_EBX_LOGICAL_COUNT_SHIFT)
            )
            e.edx &= ~CPUID_1_EDX_HTT
            e.ecx |= CPUID_1_ECX_HYPERVISOR
        for leaf, subleaf, reg, bit in hidden:
            if e.function == leaf and e.index == subleaf:
                setattr(e, reg, getattr(e, reg) & ~(1 << bit))
        if e.function == CPUID_XSAVE_LEAF and ("xsave" in hide):
            e.eax = e.ebx = e.ecx = e.edx = 0
    return out


def cpuid_signature(table: ctypes.Structure) -> bytes | None:
    """The hypervisor signature of leaf 0x40000000 (EBX, ECX, EDX), e.g. b"KVMKVMKVM\\0\\0\\0"."""
    for i in range(table.nent):
        e = table.entries[i]
        if e.function == KVM_CPUID_SIGNATURE:
            return struct.pack("<III", e.ebx, e.ecx, e.edx)
    return None


#: Leaf 0x80000008 EAX[7:0]: the physical address width, MAXPHYADDR (SDM Vol. 2A, CPUID).
CPUID_ADDRESS_SIZES = 0x80000008
CPUID_1_EDX_PAE = 1 << 6
#: Without leaf 0x80000008, MAXPHYADDR is 36 with PAE and 32 without (SDM Vol. 3A 4.1.4; Linux's
#: get_cpu_address_sizes() starts from the same default).
MAXPHYADDR_PAE, MAXPHYADDR_NO_PAE = 36, 32


def physical_address_bits(table: ctypes.Structure) -> int:
    """MAXPHYADDR as a vCPU given this CPUID table (a kvm_cpuid2) reports it. normalise_cpuid keeps
    leaf 0x80000008 as KVM_GET_SUPPORTED_CPUID gives it, so the supported table says what the
    guest's CPU will: the host's width on kvm, the engine's page walk's on the model."""
    pae = False
    for i in range(table.nent):
        e = table.entries[i]
        if e.function == CPUID_ADDRESS_SIZES:
            return e.eax & 0xFF
        if e.function == 1:
            pae = bool(e.edx & CPUID_1_EDX_PAE)
    return MAXPHYADDR_PAE if pae else MAXPHYADDR_NO_PAE


# --- MSRs ---------------------------------------------------------------------------------------------

MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_DEF_TYPE_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

BOOT_MSRS: dict[int, int] = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE_ENABLE | MTRR_TYPE_WRBACK,
}

# --- FPU ----------------------------------------------------------------------------------------------

FPU_FCW_POWER_ON = 0x37F
MXCSR_POWER_ON = 0x1F80

# --- LAPIC --------------------------------------------------------------------------------------------

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_MASK = 0x700
APIC_MODE_NMI = 0x4 << 8
APIC_MODE_EXTINT = 0x7 << 8


def set_lint(state: uapi.kvm_lapic_state) -> uapi.kvm_lapic_state:
    """LINT0 = ExtINT, LINT1 = NMI in a KVM_GET_LAPIC register page (Firecracker interrupts.rs set_lint)."""
    # Not `state.regs`: ctypes returns a c_char array as bytes cut at the first NUL.
    regs = bytearray(ctypes.string_at(ctypes.addressof(state), uapi.KVM_APIC_REG_SIZE))
    for offset, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", regs, offset)
        struct.pack_into("<I", regs, offset, (value & ~APIC_MODE_MASK) | mode)
    out = uapi.kvm_lapic_state()
    ctypes.memmove(ctypes.addressof(out), bytes(regs), len(regs))
    return out


def configure_vcpu(kvm, vcpu, *, hide_features: Iterable[str] = (), irqchip: bool = True) -> None:
    """CPUID, MSRs, FPU and (with the in-kernel irqchip) LINT0/LINT1, in QEMU's/Firecracker's order."""
    vcpu.set_cpuid2(normalise_cpuid(kvm.get_supported_cpuid(), vcpu_id=vcpu.id, hide=hide_features))
    vcpu.set_msrs(BOOT_MSRS)
    vcpu.set_fpu(uapi.kvm_fpu(fcw=FPU_FCW_POWER_ON, mxcsr=MXCSR_POWER_ON))
    if irqchip:
        vcpu.set_lapic(set_lint(vcpu.get_lapic()))
