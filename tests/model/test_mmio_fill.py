"""The MMIO-bus fill device (KVM_CAP_MMIO_FILL): reads with no exit, writes dropped or exiting,
reached only where no memslot maps the gpa, kvm_io_bus registration rules."""

from __future__ import annotations

import errno

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from pcihole.hv.model.io_bus import NR_IOBUS_DEVS
from pcihole.hv.proposed import KVM_CAP_MMIO_FILL, KVM_MMIO_FILL_WRITES_EXIT
from tests.guest_runner import close_run, run_guest

FILL_GPA = 0xE0000000


def test_capability(model_hv):
    assert model_hv.check_extension(KVM_CAP_MMIO_FILL) == 1


def test_reads_fill_writes_dropped_or_exit(model_hv):
    source = f"""
        mov {FILL_GPA:#x}, %eax
        movzwl {FILL_GPA + 0x10:#x}, %ebx
        movzbl {FILL_GPA + 0x1FFF:#x}, %ecx
        movl $1, {FILL_GPA:#x}
        movl $2, {FILL_GPA + 0x100000:#x}
        mov {FILL_GPA + 0x100000:#x}, %edx
        mov %eax, 0x2000
        mov %ebx, 0x2004
        mov %ecx, 0x2008
        mov %edx, 0x200c
        hlt
    """

    def setup(vm):
        vm.register_mmio_fill(FILL_GPA, 0x2000)
        vm.register_mmio_fill(FILL_GPA + 0x100000, 0x1000, fill=0x5A, flags=KVM_MMIO_FILL_WRITES_EXIT)

    run = run_guest(model_hv, source, setup=setup)
    try:
        assert run.exits == [exits.MmioWrite(FILL_GPA + 0x100000, b"\2\0\0\0"), exits.Hlt()]
        assert run.results[:16] == bytes.fromhex("ffffffff ffff0000 ff000000 5a5a5a5a")
    finally:
        close_run(run)


def test_memslot_wins_over_the_bus_and_access_must_fit_inside(model_hv):
    source = f"""
        mov {FILL_GPA:#x}, %eax
        mov {FILL_GPA + 0x1FFE:#x}, %ebx
        mov %eax, 0x2000
        hlt
    """

    def setup(vm):
        ram = HostMapping.anonymous(0x1000)
        ram.write(0, b"\x11\x22\x33\x44")
        vm.register_mmio_fill(FILL_GPA, 0x2000)
        vm.set_user_memory_region(5, 0, FILL_GPA, 0x1000, ram.addr)
        return ram

    run = run_guest(model_hv, source, setup=setup)
    try:
        # the slot answers the first read; the fill device only the part of the second one that it
        # contains: the bytes past its end exit
        assert run.results[:4] == b"\x11\x22\x33\x44"
        assert len(run.exits) == 2 and isinstance(run.exits[-1], exits.Hlt)
        assert run.exits[0].addr == FILL_GPA + 0x2000
    finally:
        close_run(run)


def test_page_crossing_read_exits_like_kvm(model_hv):
    """KVM's emulator splits at the page boundary: 2 bytes from the device, 2 bytes exit."""
    run = run_guest(
        model_hv,
        f"mov {FILL_GPA + 0x1FFE:#x}, %ebx\n hlt",
        setup=lambda vm: vm.register_mmio_fill(FILL_GPA, 0x2000),
    )
    try:
        assert run.exits[0] == exits.MmioRead(FILL_GPA + 0x2000, 2)
    finally:
        close_run(run)


def test_overlaps_allowed_first_in_bus_order_answers(model_hv):
    """kvm_io_bus_register_dev inserts before the first range comparing greater (kvm_io_bus_cmp), so
    a wider range registered later lands after narrower ones at higher addresses, and the bsearch of
    kvm_io_bus_get_first_dev can miss it: the kernel's behaviour, kept by the model."""
    vm = model_hv.create_vm()
    vm.register_mmio_fill(0x1000, 0x1000, fill=0x11)
    vm.register_mmio_fill(0x1000, 0x1000, fill=0x22)
    vm.register_mmio_fill(0x800, 0x2000, fill=0x33)
    assert [r.dev.fill for r in vm.mmio_bus.ranges] == [0x11, 0x22, 0x33]
    assert vm.mmio_bus.read(0x1000, 4) == b"\x11" * 4  # equal ranges: registration order
    assert vm.mmio_bus.read(0x900, 4) is None  # only the 0x800 device contains it; bsearch misses
    vm.unregister_mmio_fill(0x1000, 0x1000)
    assert vm.mmio_bus.read(0x1000, 4) == b"\x22" * 4
    assert vm.mmio_bus.read(0x1FFE, 4) == b"\x33" * 4  # inside the 0x800 device only
    assert vm.mmio_bus.read(0x27FE, 4) is None  # not wholly inside any device


def test_register_rules(model_hv):
    vm = model_hv.create_vm()
    for args in ((0x1000, 0), (2**64 - 0x1000, 0x2000), (0x1000, 0x1000, 0x100), (0x1000, 0x1000, 0xFF, 2)):
        with pytest.raises(OSError) as e:
            vm.register_mmio_fill(*args)
        assert e.value.errno == errno.EINVAL, args
    with pytest.raises(OSError) as e:
        vm.unregister_mmio_fill(0x1000, 0x1000)
    assert e.value.errno == errno.ENOENT


def test_bus_holds_nr_iobus_devs_shared_with_coalesced_zones(model_hv):
    vm = model_hv.create_vm()
    for i in range(NR_IOBUS_DEVS - 1):
        vm.register_mmio_fill(i * 0x1000, 0x1000)
    vm.register_coalesced_mmio(0x10000000, 8)  # the 1000th device on KVM_MMIO_BUS
    for call in (
        lambda: vm.register_mmio_fill(0x20000000, 8),
        lambda: vm.register_coalesced_mmio(0x30000000, 8),
    ):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOSPC
    vm.register_coalesced_mmio(0x80, 1, pio=True)  # KVM_PIO_BUS is a separate bus
