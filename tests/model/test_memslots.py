"""The memslot rules of kvm_set_memory_region on the model, as the selftests check them
(docs/kvm-memslot-rules.md), run on both backends where the kernel can take the request (never flag
bit 2 on kvm)."""

from __future__ import annotations

import errno

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv.model.memslots import KVM_MEM_MAX_NR_PAGES, TASK_SIZE_MAX, MemslotChange
from pcihole.hv.uapi import KvmCap, KvmMemFlag
from tests.backends import BACKENDS

P = 0x1000
GPA = 0xC0000000
SIZE = 0x200000
LOG = KvmMemFlag.KVM_MEM_LOG_DIRTY_PAGES
RO = KvmMemFlag.KVM_MEM_READONLY


@pytest.fixture
def vm_and_mem(hypervisor):
    vm = hypervisor.create_vm()
    mem = HostMapping.anonymous(2 * SIZE)
    vm.set_user_memory_region(10, 0, GPA, SIZE, mem.addr)
    yield vm, mem
    vm.close()
    mem.close()


def errno_of(call) -> int:
    try:
        call()
    except OSError as e:
        return e.errno
    return 0


CASES = [
    ("size not page aligned", lambda vm, m: vm.set_user_memory_region(11, 0, 0, P + 1, m.addr), errno.EINVAL),
    ("gpa not aligned", lambda vm, m: vm.set_user_memory_region(11, 0, 0x800, P, m.addr), errno.EINVAL),
    ("hva not aligned", lambda vm, m: vm.set_user_memory_region(11, 0, 0, P, m.addr + 8), errno.EINVAL),
    ("hva above TASK_SIZE_MAX", lambda vm, m: vm.set_user_memory_region(11, 0, 0, 2 * P, TASK_SIZE_MAX - P), errno.EINVAL),
    ("hva right at the limit", lambda vm, m: vm.set_user_memory_region(11, 0, 0, P, TASK_SIZE_MAX - P), 0),
    ("gpa+size wraps", lambda vm, m: vm.set_user_memory_region(11, 0, 2**64 - P, 2 * P, m.addr), errno.EINVAL),
    ("slot >= NR_MEMSLOTS", lambda vm, m: vm.set_user_memory_region(32764, 0, 0, P, m.addr), errno.EINVAL),
    ("last user slot", lambda vm, m: vm.set_user_memory_region(32763, 0, 0, P, m.addr), 0),
    ("as_id 1", lambda vm, m: vm.set_user_memory_region((1 << 16) | 11, 0, 0, P, m.addr), errno.EINVAL),
    ("npages > MAX_NR_PAGES", lambda vm, m: vm.set_user_memory_region(11, 0, 0, (KVM_MEM_MAX_NR_PAGES + 1) * P, 0), errno.EINVAL),
    ("unknown flag bit 3", lambda vm, m: vm.set_user_memory_region(11, 8, 0, P, m.addr), errno.EINVAL),
    ("delete a missing slot", lambda vm, m: vm.set_user_memory_region(11, 0, 0, 0, 0), errno.EINVAL),
    ("change size", lambda vm, m: vm.set_user_memory_region(10, 0, GPA, 2 * SIZE, m.addr), errno.EINVAL),
    ("change hva", lambda vm, m: vm.set_user_memory_region(10, 0, GPA, SIZE, m.addr + SIZE), errno.EINVAL),
    ("toggle READONLY", lambda vm, m: vm.set_user_memory_region(10, RO, GPA, SIZE, m.addr), errno.EINVAL),
    ("overlap", lambda vm, m: vm.set_user_memory_region(11, 0, GPA + SIZE - P, P, m.addr), errno.EEXIST),
    ("move onto another slot", lambda vm, m: (vm.set_user_memory_region(11, 0, 0, P, m.addr), vm.set_user_memory_region(11, 0, GPA, P, m.addr)), errno.EEXIST),
    ("npages far above the limit", lambda vm, m: vm.set_user_memory_region(11, 0, GPA, 1 << 52, m.addr), errno.EINVAL),
    ("above kvm_mmu_max_gfn", lambda vm, m: vm.set_user_memory_region(11, 0, 1 << 52, P, m.addr), errno.EINVAL),
    ("identical re-set", lambda vm, m: vm.set_user_memory_region(10, 0, GPA, SIZE, m.addr), 0),
    ("move onto itself, shifted", lambda vm, m: vm.set_user_memory_region(10, 0, GPA - P, SIZE, m.addr), 0),
    ("LOG_DIRTY toggle", lambda vm, m: vm.set_user_memory_region(10, LOG, GPA, SIZE, m.addr), 0),
    ("delete ignores other fields", lambda vm, m: vm.set_user_memory_region(10, LOG, 0x1000, 0, 0), 0),
    ("delete checks gpa alignment first", lambda vm, m: vm.set_user_memory_region(10, 0, 0x800, 0, 0), errno.EINVAL),
]  # fmt: skip


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
@pytest.mark.parametrize("name, call, expected", CASES, ids=[c[0] for c in CASES])
def test_memslot_rule(vm_and_mem, name, call, expected):
    vm, mem = vm_and_mem
    assert errno_of(lambda: call(vm, mem)) == expected


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
def test_invalid_memory_region_flags(hypervisor):
    """set_memory_region_test: every unsupported bit through v1 is EINVAL (bit 2 only on the model)."""
    vm = hypervisor.create_vm()
    supported = LOG | RO | (4 if hypervisor.implements_proposed_abi else 0)
    for bit in range(32):
        if (1 << bit) & supported or (bit == 2 and not hypervisor.implements_proposed_abi):
            continue
        assert errno_of(lambda b=bit: vm.set_user_memory_region(0, 1 << b, 0, SIZE, 0)) == errno.EINVAL, bit
    vm.close()


def test_change_kinds_and_max_pages_on_the_model(model_hv):
    vm = model_hv.create_vm()
    assert vm.change_memory_region(1, 0, 0, KVM_MEM_MAX_NR_PAGES * P, 0) is MemslotChange.CREATE
    assert vm.change_memory_region(1, LOG, 0, KVM_MEM_MAX_NR_PAGES * P, 0) is MemslotChange.FLAGS_ONLY
    assert vm.change_memory_region(1, LOG, 1 << 44, KVM_MEM_MAX_NR_PAGES * P, 0) is MemslotChange.MOVE
    assert vm.change_memory_region(1, LOG, 1 << 44, KVM_MEM_MAX_NR_PAGES * P, 0) is None
    assert vm.change_memory_region(1, 0, 0, 0, 0) is MemslotChange.DELETE
    assert vm.memslots.nr_memslot_pages == 0


def test_add_max_memory_regions_on_the_model(model_hv):
    """test_add_max_memory_regions: all KVM_CAP_NR_MEMSLOTS slots fit, one more is EINVAL."""
    vm = model_hv.create_vm()
    n = vm.check_extension(KvmCap.KVM_CAP_NR_MEMSLOTS)
    assert n == 32764
    base = 0x10000000000
    for slot in range(n):
        vm.set_user_memory_region(slot, 0, slot * SIZE, SIZE, base + slot * SIZE)
    assert len(vm.memslots) == n
    assert errno_of(lambda: vm.set_user_memory_region(n, 0, n * SIZE, SIZE, base)) == errno.EINVAL
    assert vm.memslots.find_gpa(1234 * SIZE + 5).id == 1234


def test_errors_name_the_ioctl_and_the_other_slot(model_hv):
    vm = model_hv.create_vm()
    vm.set_user_memory_region(3, 0, 0xB0000000, 0x10000000, 0)
    with pytest.raises(OSError) as e:
        vm.set_user_memory_region(7, 0, 0xB8000000, 0x1000, 0)
    assert "KVM_SET_USER_MEMORY_REGION(slot=7" in str(e.value)
    assert "slot 3 [0xb0000000, 0xbfffffff]" in str(e.value)
