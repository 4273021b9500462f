"""KVM_SET_USER_MEMORY_REGION on the real /dev/kvm: the pure checks of set_memory_region_test.c.

Each case names the kernel check (kvm_set_memory_region, docs/kvm-memslot-rules.md) that
decides its errno.
"""

from __future__ import annotations

import errno

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv.ioctls import KvmIoctl
from pcihole.hv.kvm import ioctl as ioctl_mod
from pcihole.hv.kvm.vm import MemslotFlagRefused
from pcihole.hv.uapi import KvmCap, KvmMemFlag

pytestmark = pytest.mark.kvm

MiB = 1 << 20
RO = KvmMemFlag.KVM_MEM_READONLY
LOG = KvmMemFlag.KVM_MEM_LOG_DIRTY_PAGES
GPA = 0xC0000000  # MEM_REGION_GPA of the selftest


@pytest.fixture
def mem():
    m = HostMapping.anonymous(4 * MiB)
    yield m
    m.close()


def expect_errno(err, fn, *args):
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == err, info.value
    return info.value


def test_misaligned_size_gpa_hva_are_einval(kvm_vm, mem):
    set_region = kvm_vm.set_user_memory_region
    expect_errno(errno.EINVAL, set_region, 0, 0, GPA, 2 * MiB + 1, mem.addr)  # size % PAGE_SIZE
    expect_errno(errno.EINVAL, set_region, 0, 0, GPA + 1, 2 * MiB, mem.addr)  # gpa % PAGE_SIZE
    expect_errno(errno.EINVAL, set_region, 0, 0, GPA, 2 * MiB, mem.addr + 1)  # hva % PAGE_SIZE


def test_wrapping_gpa_is_einval(kvm_vm, mem):
    expect_errno(errno.EINVAL, kvm_vm.set_user_memory_region, 0, 0, 2**64 - 4096, 2 * MiB, mem.addr)


def test_too_many_pages_is_einval(kvm_vm, mem):
    # npages > KVM_MEM_MAX_NR_PAGES (2^31 - 1); access_ok fails first for a range past the user
    # address limit, with the same errno.
    expect_errno(errno.EINVAL, kvm_vm.set_user_memory_region, 0, 0, 0, 2**31 * 4096, mem.addr)


def test_slot_id_at_limit_and_address_space_bits_are_einval(kvm_vm, mem):
    nr = kvm_vm.check_extension(KvmCap.KVM_CAP_NR_MEMSLOTS)
    expect_errno(errno.EINVAL, kvm_vm.set_user_memory_region, nr, 0, GPA, 2 * MiB, mem.addr)
    if kvm_vm.check_extension(KvmCap.KVM_CAP_MULTI_ADDRESS_SPACE) <= 1:
        expect_errno(errno.EINVAL, kvm_vm.set_user_memory_region, (1 << 16) | 0, 0, GPA, 2 * MiB, mem.addr)


def test_overlap_is_eexist_and_names_the_request(kvm_vm, mem):
    kvm_vm.set_user_memory_region(0, 0, GPA, 2 * MiB, mem.addr)
    err = expect_errno(
        errno.EEXIST, kvm_vm.set_user_memory_region, 1, 0, GPA + MiB, 2 * MiB, mem.addr + 2 * MiB
    )
    assert "KVM_SET_USER_MEMORY_REGION" in str(err) and "slot=1" in str(err)


def test_delete_missing_slot_is_einval(kvm_vm):
    expect_errno(errno.EINVAL, kvm_vm.set_user_memory_region, 5, 0, 0, 0, 0)


def test_live_slot_changes(kvm_vm, mem):
    set_region = kvm_vm.set_user_memory_region
    set_region(3, 0, GPA, 2 * MiB, mem.addr)
    expect_errno(errno.EINVAL, set_region, 3, 0, GPA, 1 * MiB, mem.addr)  # resize
    expect_errno(errno.EINVAL, set_region, 3, 0, GPA, 2 * MiB, mem.addr + 2 * MiB)  # new hva
    expect_errno(errno.EINVAL, set_region, 3, RO, GPA, 2 * MiB, mem.addr)  # toggle READONLY
    set_region(3, 0, GPA, 2 * MiB, mem.addr)  # identical re-set: a no-op
    set_region(3, 0, GPA + 4 * MiB, 2 * MiB, mem.addr)  # MOVE
    set_region(3, LOG, GPA + 4 * MiB, 2 * MiB, mem.addr)  # FLAGS_ONLY: start logging
    assert kvm_vm.get_dirty_log(3) == bytes(64)  # 512 pages, none written
    set_region(3, 0, GPA + 4 * MiB, 2 * MiB, mem.addr)  # FLAGS_ONLY: stop logging
    expect_errno(errno.ENOENT, kvm_vm.get_dirty_log, 3)
    set_region(3, 0, 0, 0, 0)  # DELETE
    expect_errno(errno.EINVAL, set_region, 3, 0, 0, 0, 0)  # already gone


def test_flag_bit_2_is_refused_before_the_ioctl(kvm_vm, mem, monkeypatch):
    calls = []
    real = ioctl_mod.kvm_ioctl

    def spy(fd, request, *args, **kwargs):
        calls.append(request)
        return real(fd, request, *args, **kwargs)

    monkeypatch.setattr("pcihole.hv.kvm.vm.kvm_ioctl", spy)
    err = expect_errno(errno.EINVAL, kvm_vm.set_user_memory_region, 0, 1 << 2, GPA, 2 * MiB, 0)
    assert isinstance(err, MemslotFlagRefused)
    assert "KVM_MEM_GUEST_MEMFD" in str(err) and "KVM_MEM_PCI_HOLE" in str(err)
    assert KvmIoctl.KVM_SET_USER_MEMORY_REGION not in calls
    # The spy does see the ioctl when the request is legal, so the assertion above is meaningful.
    kvm_vm.set_user_memory_region(0, 0, GPA, 2 * MiB, mem.addr)
    assert KvmIoctl.KVM_SET_USER_MEMORY_REGION in calls


def test_dirty_log_errno(kvm_vm, mem):
    kvm_vm.set_user_memory_region(1, LOG, GPA, 2 * MiB, mem.addr)
    kvm_vm.set_user_memory_region(2, 0, 0, 2 * MiB, mem.addr + 2 * MiB)
    expect_errno(errno.ENOENT, kvm_vm.get_dirty_log, 2)  # no LOG_DIRTY_PAGES
    expect_errno(errno.ENOENT, kvm_vm.get_dirty_log, 9)  # no slot
    expect_errno(errno.EINVAL, kvm_vm.clear_dirty_log, 1, 1, 64, bytes(8))  # first_page % 64
    expect_errno(errno.EINVAL, kvm_vm.clear_dirty_log, 1, 64, 10, bytes(8))  # num_pages % 64 mid-slot
    kvm_vm.clear_dirty_log(1, 64, 512 - 64, bytes(56))  # runs to the end of the slot: fine


def test_nr_memslots_slots_then_one_more_is_einval(kvm_vm):
    """test_add_max_memory_regions: N slots of 2 MiB succeed; slot N fails with EINVAL.

    One MAP_NORESERVE reservation of N * 2 MiB (64 GiB of address space, nothing touched).
    """
    nr = kvm_vm.check_extension(KvmCap.KVM_CAP_NR_MEMSLOTS)
    assert nr > 0
    size = 2 * MiB
    with HostMapping.anonymous(nr * size) as backing, HostMapping.anonymous(size) as extra:
        for slot in range(nr):
            kvm_vm.set_user_memory_region(slot, 0, slot * size, size, backing.addr + slot * size)
        expect_errno(errno.EINVAL, kvm_vm.set_user_memory_region, nr, 0, nr * size, size, extra.addr)
        for slot in range(nr):
            kvm_vm.set_user_memory_region(slot, 0, 0, 0, 0)
