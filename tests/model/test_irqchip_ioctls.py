"""KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2 and KVM_IRQ_LINE on both backends: the same errno in the same
order (kvm_arch_vm_ioctl, kvm_vm_ioctl_irq_line), the capabilities that advertise them, and the
local APIC's registers after vCPU creation (kvm_lapic_reset) compared with KVM_GET_LAPIC."""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from pcihole.hv import open_backend
from pcihole.hv.cpu_setup import set_lint
from pcihole.hv.uapi import KvmCap
from tests.backends import on_both_backends

#: The registers kvm_lapic_reset sets, by offset (timer count, ICR and ISR/IRR are zero on both).
RESET_REGISTERS = (0x20, 0x30, 0x80, 0xD0, 0xE0, 0xF0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x380, 0x3E0)


def _errno(call, *args) -> int:
    try:
        call(*args)
    except OSError as e:
        return e.errno
    return 0


@on_both_backends
def test_irqchip_ioctls_fail_as_the_kernel_does(hypervisor):
    vm = hypervisor.create_vm()
    try:
        assert vm.check_extension(KvmCap.KVM_CAP_IRQCHIP) and vm.check_extension(KvmCap.KVM_CAP_PIT2)
        seen = [
            _errno(vm.create_pit2),  # no PIC yet
            _errno(vm.set_irq_line, 4, True),  # no irqchip
            _errno(vm.create_irqchip),
            _errno(vm.create_irqchip),
            _errno(vm.create_pit2),
            _errno(vm.create_pit2),
            _errno(vm.set_irq_line, 4, True),
            _errno(vm.set_irq_line, 4, False),
            _errno(vm.set_irq_line, 100, True),  # no route: accepted, does nothing
        ]
    finally:
        vm.close()
    assert seen == [errno.ENOENT, errno.ENXIO, 0, errno.EEXIST, 0, errno.EEXIST, 0, 0, 0]


@on_both_backends
def test_irqchip_after_a_vcpu_is_einval(hypervisor):
    vm = hypervisor.create_vm()
    try:
        vm.create_vcpu(0)
        assert _errno(vm.create_irqchip) == errno.EINVAL
    finally:
        vm.close()


def _lapic_registers(hypervisor, vcpu) -> dict[int, int]:
    """KVM_GET_LAPIC's page (the whole of it: .regs, a c_char array, stops at the first NUL)."""
    page = bytes(vcpu.get_lapic())
    return {off: struct.unpack_from("<I", page, off)[0] for off in RESET_REGISTERS}


@on_both_backends
def test_lapic_registers_after_creation(hypervisor):
    """kvm_lapic_reset: ID = vCPU id << 24, version 0x50014, every LVT masked but LVT0 of the BSP
    (ExtINT), DFR flat, SVR 0xff, TPR / LDR / TDCR / TMICT 0."""
    vm = hypervisor.create_vm()
    try:
        vm.create_irqchip()
        regs = [_lapic_registers(hypervisor, vm.create_vcpu(i)) for i in (0, 1)]
    finally:
        vm.close()
    masked = 0x10000
    expected = {
        0x20: 0,
        0x30: 0x50014,
        0x80: 0,
        0xD0: 0,
        0xE0: 0xFFFFFFFF,
        0xF0: 0xFF,
        0x320: masked,
        0x330: masked,
        0x340: masked,
        0x350: 0x700,
        0x360: masked,
        0x370: masked,
        0x380: 0,
        0x3E0: 0,
    }
    assert regs[0] == expected
    assert regs[1] == {**expected, 0x20: 1 << 24, 0x350: masked}


def test_model_vcpu_gets_a_lapic_only_with_the_irqchip():
    hypervisor = open_backend("model")
    try:
        plain = hypervisor.create_vm()
        assert plain.create_vcpu(0).lapic is None
        vm = hypervisor.create_vm()
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        assert vcpu.lapic is not None
        # IA32_APIC_BASE is the LAPIC's now: enabled, BSP, at 0xfee00000; x2APIC refused before CPUID
        assert vcpu.get_msrs([0x1B]) == {0x1B: 0xFEE00900}
        with pytest.raises(OSError) as refused:
            vcpu.set_msrs({0x1B: 0xFEE00D00})
        assert refused.value.errno == errno.EINVAL
    finally:
        hypervisor.close()


@on_both_backends
def test_get_set_lapic(hypervisor):
    """KVM_GET/SET_LAPIC: EINVAL without the irqchip; LINT0 ExtINT / LINT1 NMI (still masked) as the machine sets
    them (cpu_setup.set_lint) read back; TPR set through the page reads back, PPR follows it."""
    vm = hypervisor.create_vm()
    try:
        plain = vm.create_vcpu(0)
        assert _errno(plain.get_lapic) == errno.EINVAL
    finally:
        vm.close()
    vm = hypervisor.create_vm()
    try:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        state = set_lint(vcpu.get_lapic())
        ctypes.memmove(ctypes.addressof(state) + 0x80, struct.pack("<I", 0x20), 4)  # TPR
        vcpu.set_lapic(state)
        page = bytes(vcpu.get_lapic())
    finally:
        vm.close()
    lvt0, lvt1, tpr, ppr = (struct.unpack_from("<I", page, off)[0] for off in (0x350, 0x360, 0x80, 0xA0))
    assert (lvt0, lvt1, tpr, ppr) == (0x700, 0x10400, 0x20, 0x20)  # set_lint keeps the mask bit
