"""Port of the PCI_HOLE series' selftest x86_64/memory_slot_pci_hole.c (posted with v2, never merged).

Slot 10 at 0xc0000000, 4 pages, no backing (hva 0), KVM_MEM_PCI_HOLE. The guest reads a byte at
the start and at +5000 (0xff each, no exit), then writes a u64 at +1024 and at +8000: each write
exits with KVM_EXIT_MMIO. Every other exit is a "ucall" (here an OUT to port 0xf0 carrying the
stage number and, for reads, the value read). Skipped where the backend lacks the proposed ABI,
i.e. on the real kernel (whose capability 187 is KVM_CAP_STEAL_TIME, so it answers 1 there too).
"""

from __future__ import annotations

import errno

import pytest

from pcihole.hv import exits
from pcihole.hv.proposed import KVM_CAP_PCI_HOLE_MEM, KVM_MEM_PCI_HOLE
from pcihole.hv.uapi import KvmMemFlag
from tests.backends import BACKENDS
from tests.guest_runner import run_guest

MEM_REGION_GPA = 0xC0000000
MEM_REGION_SIZE = 0x4000
MEM_REGION_SLOT = 10
UCALL_PORT = 0xF0

GUEST = f"""
    movzbl {MEM_REGION_GPA:#x}, %eax
    out %eax, ${UCALL_PORT}
    movzbl {MEM_REGION_GPA + 5000:#x}, %eax
    out %eax, ${UCALL_PORT}
    movl $0x11223344, {MEM_REGION_GPA + 1024:#x}
    movl $0x55667788, {MEM_REGION_GPA + 1024 + 4:#x}
    mov $0, %eax
    out %eax, ${UCALL_PORT}
    movl $0xaabbccdd, {MEM_REGION_GPA + 8000:#x}
    mov $0, %eax
    out %eax, ${UCALL_PORT}
    hlt
"""


def require_pci_hole(hv):
    if not hv.implements_proposed_abi:
        pytest.skip(f"{hv.name} backend lacks KVM_CAP_PCI_HOLE_MEM (the seed's ABI was never merged)")
    assert hv.check_extension(KVM_CAP_PCI_HOLE_MEM) == 1


def pci_hole_slot(vm):
    vm.set_user_memory_region(MEM_REGION_SLOT, KVM_MEM_PCI_HOLE, MEM_REGION_GPA, MEM_REGION_SIZE, 0)


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
def test_memory_slot_pci_hole(hypervisor):
    require_pci_hole(hypervisor)
    run = run_guest(hypervisor, GUEST, setup=pci_hole_slot, max_exits=20)
    try:
        assert run.exits == [
            exits.IoOut(UCALL_PORT, 4, b"\xff\0\0\0"),  # stage 1: byte @gpa = 0xff
            exits.IoOut(UCALL_PORT, 4, b"\xff\0\0\0"),  # stage 2: byte @gpa+5000 = 0xff
            exits.MmioWrite(MEM_REGION_GPA + 1024, (0x11223344).to_bytes(4, "little")),  # stage 3
            exits.MmioWrite(MEM_REGION_GPA + 1028, (0x55667788).to_bytes(4, "little")),
            exits.IoOut(UCALL_PORT, 4, bytes(4)),
            exits.MmioWrite(MEM_REGION_GPA + 8000, (0xAABBCCDD).to_bytes(4, "little")),  # stage 5
            exits.IoOut(UCALL_PORT, 4, bytes(4)),
            exits.Hlt(),
        ]
    finally:
        run.vm.close()
        run.ram.close()


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
def test_pci_hole_reads_every_size_as_ones_and_writes_change_nothing(hypervisor):
    require_pci_hole(hypervisor)
    base = MEM_REGION_GPA + 0x1FF8
    source = f"""
        movb $0, {base:#x}
        movzbl {base:#x}, %eax
        movzwl {base + 2:#x}, %ebx
        mov {base + 4:#x}, %ecx
        movq {base:#x}, %mm0  # an 8-byte read (MMX needs only CR0.EM = 0)
        movq %mm0, 0x2010
        mov %eax, 0x2000
        mov %ebx, 0x2004
        mov %ecx, 0x2008
        hlt
    """
    run = run_guest(hypervisor, source, setup=pci_hole_slot, max_exits=10)
    try:
        assert run.exits == [exits.MmioWrite(base, b"\0"), exits.Hlt()]
        assert run.results[:24] == bytes.fromhex("ff000000ffff0000ffffffff00000000") + b"\xff" * 8
    finally:
        run.vm.close()
        run.ram.close()


@pytest.mark.parametrize(
    "flags, hva, why",
    [
        (KVM_MEM_PCI_HOLE | KvmMemFlag.KVM_MEM_READONLY, 0, "with READONLY"),
        (KVM_MEM_PCI_HOLE | KvmMemFlag.KVM_MEM_LOG_DIRTY_PAGES, 0, "with LOG_DIRTY_PAGES"),
        (KVM_MEM_PCI_HOLE, 0x10000, "with a userspace_addr"),
        (KVM_MEM_PCI_HOLE, 0x10, "with a misaligned userspace_addr"),
    ],
)
def test_pci_hole_v2_setup_rules(model_hv, flags, hva, why):
    vm = model_hv.create_vm()
    with pytest.raises(OSError) as e:
        vm.set_user_memory_region(MEM_REGION_SLOT, flags, MEM_REGION_GPA, MEM_REGION_SIZE, hva)
    assert e.value.errno == errno.EINVAL, why
    assert len(vm.memslots) == 0


def test_pci_hole_is_large_cheap_and_cannot_be_toggled(model_hv):
    vm = model_hv.create_vm()
    vm.set_user_memory_region(MEM_REGION_SLOT, KVM_MEM_PCI_HOLE, MEM_REGION_GPA, 1 << 40, 0)
    for flags in (0, KvmMemFlag.KVM_MEM_READONLY):
        with pytest.raises(OSError) as e:
            vm.set_user_memory_region(MEM_REGION_SLOT, flags, MEM_REGION_GPA, 1 << 40, 0)
        assert e.value.errno == errno.EINVAL
    # a plain slot cannot become a hole either
    vm.set_user_memory_region(1, 0, 0, 0x1000, 0)
    with pytest.raises(OSError) as e:
        vm.set_user_memory_region(1, KVM_MEM_PCI_HOLE, 0, 0x1000, 0)
    assert e.value.errno == errno.EINVAL
    # a move keeps the flag and is allowed; so is delete
    vm.set_user_memory_region(MEM_REGION_SLOT, KVM_MEM_PCI_HOLE, 1 << 41, 1 << 40, 0)
    assert vm.memslots.by_id[MEM_REGION_SLOT].gpa == 1 << 41
    vm.set_user_memory_region(MEM_REGION_SLOT, 0, 0, 0, 0)
    assert MEM_REGION_SLOT not in vm.memslots.by_id
