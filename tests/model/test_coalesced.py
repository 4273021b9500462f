"""Coalesced MMIO/PIO rules (virt/kvm/coalesced_mmio.c) and the ring, including coalesced_io_test."""

from __future__ import annotations

import errno

import pytest

from pcihole.hv import exits
from pcihole.hv.uapi import KVM_COALESCED_MMIO_MAX, KvmCap
from tests.backends import BACKENDS
from tests.guest_runner import close_run, run_guest

MMIO_GPA = 1 << 32  # coalesced_io_test: 4 GiB, length 8, no memslot
PIO_PORT = 0x80


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
def test_capabilities(hypervisor):
    assert hypervisor.check_extension(KvmCap.KVM_CAP_COALESCED_MMIO) == 2
    assert hypervisor.check_extension(KvmCap.KVM_CAP_COALESCED_PIO) == 1


def test_pio_must_be_0_or_1(model_hv):
    vm = model_hv.create_vm()
    with pytest.raises(OSError) as e:
        vm.register_coalesced_mmio(0x1000, 8, pio=2)
    assert e.value.errno == errno.EINVAL


def _coalesced_errnos(vm) -> list[int]:
    """The errno (0: success) of each register / unregister call with pio 0, 1 and invalid values."""
    calls = [
        (vm.register_coalesced_mmio, 0x1000, 8, 0),
        (vm.register_coalesced_mmio, PIO_PORT, 8, 1),
        *(
            (op, 0x1000, 8, pio)
            for pio in (2, 3, 0xFFFFFFFF)
            for op in (vm.register_coalesced_mmio, vm.unregister_coalesced_mmio)
        ),
        (vm.unregister_coalesced_mmio, 0x5000, 4, 0),  # matches nothing: 0
        (vm.unregister_coalesced_mmio, 0x1000, 8, 0),
        (vm.unregister_coalesced_mmio, PIO_PORT, 8, 1),
    ]
    out = []
    for op, addr, size, pio in calls:
        try:
            op(addr, size, pio)
            out.append(0)
        except OSError as e:
            out.append(e.errno)
    return out


@pytest.mark.kvm
def test_pio_other_than_0_or_1_is_einval_for_both_ioctls_as_on_the_kernel(kvm_hv, model_hv):
    """kvm_vm_ioctl_(un)register_coalesced_mmio: `zone->pio != 1 && zone->pio != 0` -> -EINVAL."""
    kvm_vm, model_vm = kvm_hv.create_vm(), model_hv.create_vm()
    try:
        kernel = _coalesced_errnos(kvm_vm)
        assert _coalesced_errnos(model_vm) == kernel
        assert kernel.count(errno.EINVAL) == 6  # register and unregister, for each of 3 bad values
    finally:
        kvm_vm.close()
        model_vm.close()


def test_unregister_removes_contained_zones_of_the_same_kind(model_hv):
    vm = model_hv.create_vm()
    vm.register_coalesced_mmio(0x1000, 0x100)
    vm.register_coalesced_mmio(0x1000, 0x10)
    vm.register_coalesced_mmio(0x1000, 0x10, pio=True)
    vm.unregister_coalesced_mmio(0x1008, 4)  # inside both MMIO zones
    assert [(z.addr, z.size, z.pio) for z in vm.coalesced_zones.zones] == [(0x1000, 0x10, 1)]
    vm.unregister_coalesced_mmio(0x5000, 4)  # matches nothing: still 0
    assert len(vm.coalesced_zones.zones) == 1


def coalesced_io_guest(count: int) -> str:
    """x86 coalesced_io_test guest: alternate 8-byte MMIO writes and 4-byte OUTs, count in total."""
    lines = []
    for i in range(count):
        if i % 2 == 0:
            lines += [f"mov ${MMIO_GPA + i:#x}, %eax", f"mov %eax, {MMIO_GPA & 0xFFFFFFFF:#x}(%ebx)"]
        else:
            lines += [f"mov ${i:#x}, %eax", f"outl %eax, ${PIO_PORT:#x}"]
    return "\n".join(lines) + "\nhlt"


@pytest.mark.parametrize("start", [0, 1, 84, KVM_COALESCED_MMIO_MAX - 1])
def test_coalesced_io_test_port(model_hv, start):
    """For a ring starting at `start`, ring_size - 1 writes coalesce and the next one exits."""
    ring_size = KVM_COALESCED_MMIO_MAX
    # MMIO_GPA is above 4 GiB; a 32-bit guest cannot reach it, so use the same offset below 4 GiB.
    gpa = 0xC0000000
    source = (
        "\n".join(
            (f"movl ${i:#x}, {gpa:#x}" if i % 2 == 0 else f"mov ${i:#x}, %eax\noutl %eax, ${PIO_PORT:#x}")
            for i in range(ring_size)
        )
        + "\nhlt"
    )

    def setup(vm):
        vm.register_coalesced_mmio(gpa, 8)
        vm.register_coalesced_mmio(PIO_PORT, 8, pio=True)

    # The run starts on the model's first run(); set first = last = start before it.
    vm_holder = {}

    def setup_and_remember(vm):
        setup(vm)
        vm_holder["vm"] = vm
        vm.coalesced_ring.set_indices(start, start)

    run = run_guest(model_hv, source, setup=setup_and_remember, drain=False, max_exits=3)
    try:
        first, last = run.vcpu.ring_indices()
        assert (last + 1) % ring_size == first == start
        last_index = ring_size - 1
        expected_exit = (
            exits.MmioWrite(gpa, last_index.to_bytes(4, "little"))
            if last_index % 2 == 0
            else exits.IoOut(PIO_PORT, 4, last_index.to_bytes(4, "little"))
        )
        assert run.exits[0] == expected_exit
        entries = run.vcpu.drain_coalesced_mmio()
        assert len(entries) == ring_size - 1
        for i, entry in enumerate(entries):
            assert entry.pio == bool(i % 2)
            assert entry.addr == (PIO_PORT if i % 2 else gpa)
            assert entry.data == i.to_bytes(4, "little")
        assert run.vcpu.ring_indices() == ((start + ring_size - 1) % ring_size,) * 2
    finally:
        close_run(run)


def test_set_ring_indices_on_the_vcpu(model_hv):
    vm = model_hv.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_ring_indices(5, 5)
    assert vcpu.ring_indices() == (5, 5)
    assert vcpu.drain_coalesced_mmio() == []
