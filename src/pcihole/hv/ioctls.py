"""KVM ioctl numbers, computed the way <asm-generic/ioctl.h> computes them.

No hand-written hex: each number is _IO/_IOR/_IOW/_IOWR of the struct the kernel declares, so a
wrong struct size shows up as a wrong number (pinned in tests/hv/test_uapi.py).
"""

from __future__ import annotations

import ctypes
from enum import IntEnum

from pcihole.hv import uapi

# <asm-generic/ioctl.h>
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    assert size < (1 << _IOC_SIZEBITS), size
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOW(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


KVMIO = 0xAE


class KvmIoctl(IntEnum):
    # system ioctls (/dev/kvm)
    KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
    KVM_CREATE_VM = _IO(KVMIO, 0x01)
    KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
    KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
    KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, uapi.kvm_cpuid2)
    # VM ioctls
    KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
    KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, uapi.kvm_dirty_log)
    KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, uapi.kvm_userspace_memory_region)
    KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
    KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
    KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
    KVM_IRQ_LINE = _IOW(KVMIO, 0x61, uapi.kvm_irq_level)
    KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, uapi.kvm_irq_routing)
    KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, uapi.kvm_pit_config)
    KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, uapi.kvm_coalesced_mmio_zone)
    KVM_UNREGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x68, uapi.kvm_coalesced_mmio_zone)
    KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, uapi.kvm_enable_cap)
    KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, uapi.kvm_clear_dirty_log)
    # vCPU ioctls
    KVM_RUN = _IO(KVMIO, 0x80)
    KVM_GET_REGS = _IOR(KVMIO, 0x81, uapi.kvm_regs)
    KVM_SET_REGS = _IOW(KVMIO, 0x82, uapi.kvm_regs)
    KVM_GET_SREGS = _IOR(KVMIO, 0x83, uapi.kvm_sregs)
    KVM_SET_SREGS = _IOW(KVMIO, 0x84, uapi.kvm_sregs)
    KVM_INTERRUPT = _IOW(KVMIO, 0x86, uapi.kvm_interrupt)
    KVM_GET_MSRS = _IOWR(KVMIO, 0x88, uapi.kvm_msrs)
    KVM_SET_MSRS = _IOW(KVMIO, 0x89, uapi.kvm_msrs)
    KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, uapi.kvm_cpuid2)
    KVM_NMI = _IO(KVMIO, 0x9A)
    KVM_TRANSLATE = _IOWR(KVMIO, 0x85, uapi.kvm_translation)
    KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, uapi.kvm_lapic_state)
    KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, uapi.kvm_lapic_state)
    KVM_SET_FPU = _IOW(KVMIO, 0x8D, uapi.kvm_fpu)
    KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, uapi.kvm_mp_state)
    KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, uapi.kvm_mp_state)
    KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, uapi.kvm_vcpu_events)
    KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, uapi.kvm_vcpu_events)
