"""kvmclock on the model: the scale KVM computes, and the pages a guest's MSR writes fill."""

from __future__ import annotations

import struct
import time

import pytest

from pcihole.hv import exits
from pcihole.hv.model.kvmclock import (
    MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW,
    PVCLOCK_TSC_STABLE_BIT,
    PVCLOCK_VCPU_TIME_INFO,
    PVCLOCK_WALL_CLOCK,
    kvm_get_time_scale,
    pvclock_scale_delta,
    pvclock_tsc_khz,
)

from .system_guest import RESULTS, run_system_guest


@pytest.mark.parametrize("khz", [1_000_000, 2_500_000, 2_999_999, 3_600_000, 100_000, 4_000_000])
def test_time_scale_converts_a_second_of_ticks_into_a_second(khz):
    shift, mul = kvm_get_time_scale(10**9, khz * 1000)
    assert 0 < mul < 1 << 32 and -32 < shift < 32
    ns = pvclock_scale_delta(khz * 1000, mul, shift)  # one second of TSC ticks
    assert abs(ns - 10**9) <= 1
    assert abs(pvclock_tsc_khz(mul, shift) - khz) <= 1  # what kvm_get_tsc_khz gives Linux


def test_one_gigahertz_is_exact():
    shift, mul = kvm_get_time_scale(10**9, 10**9)
    assert (shift, mul) == (1, 1 << 31)
    assert pvclock_tsc_khz(mul, shift) == 1_000_000


PVTI = 0x7400  # in the guest's results page, past RESULTS' 256 bytes
WALL = 0x7480


BODY = f"""
    mov ${MSR_KVM_SYSTEM_TIME_NEW:#x}, %ecx
    mov ${PVTI | 1:#x}, %eax
    xor %edx, %edx
    wrmsr
    mov ${MSR_KVM_WALL_CLOCK_NEW:#x}, %ecx
    mov ${WALL:#x}, %eax
    wrmsr
    rdtsc
    mov %eax, {RESULTS}
    mov %edx, {RESULTS + 4}
    """


def test_guest_enables_kvmclock_and_gets_a_consistent_clock(model_hv):
    """After the guest's two MSR writes: the pvclock page is complete (even version, stable bit,
    the 1 GHz scale), the guest's TSC converts through it to a kvmclock time that is at least the
    published one, and the wall clock page plus that time is the host's wall-clock time."""
    pages: dict[str, bytes | None] = {}

    def on_exit(vcpu, exit_, i):
        pages["pvti"] = vcpu.vm.read_guest(PVTI, PVCLOCK_VCPU_TIME_INFO.size)
        pages["wall"] = vcpu.vm.read_guest(WALL, PVCLOCK_WALL_CLOCK.size)
        pages["kvmclock_now"] = struct.pack("<Q", vcpu.kvmclock.kvmclock_ns(time.monotonic_ns()))
        return False

    wall_before = time.time_ns()
    run = run_system_guest(
        model_hv, BODY, [], setup=lambda vcpu: vcpu.set_msrs({0x10: 5 * 10**12}), on_exit=on_exit
    )
    wall_after = time.time_ns()
    assert run.exits == [exits.Hlt()]
    guest_tsc = struct.unpack_from("<Q", run.results)[0]
    version, _, tsc_timestamp, system_time, mul, shift, flags = PVCLOCK_VCPU_TIME_INFO.unpack(pages["pvti"])
    assert version % 2 == 0 and version > 0
    assert flags & PVCLOCK_TSC_STABLE_BIT
    assert (mul, shift) == (1 << 31, 1)
    assert 5 * 10**12 <= tsc_timestamp <= guest_tsc
    guest_ns = system_time + pvclock_scale_delta(guest_tsc - tsc_timestamp, mul, shift)
    (now,) = struct.unpack("<Q", pages["kvmclock_now"])
    assert system_time <= guest_ns <= now
    wall_version, sec, nsec = PVCLOCK_WALL_CLOCK.unpack(pages["wall"])
    assert wall_version % 2 == 0 and wall_version > 0
    boot_wall = sec * 10**9 + nsec
    assert wall_before <= boot_wall + guest_ns <= wall_after


def test_kvmclock_msrs_read_back_and_disable(model_hv):
    vm = model_hv.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        vcpu.set_msrs({MSR_KVM_SYSTEM_TIME_NEW: PVTI})  # bit 0 clear: disabled, nothing written
        assert vcpu.get_msrs([MSR_KVM_SYSTEM_TIME_NEW]) == {MSR_KVM_SYSTEM_TIME_NEW: PVTI}
    finally:
        vm.close()


#: BODY, then copies of the pvclock and wall-clock structures into the results page.
COPY_PAGES = (
    BODY
    + f"""
    mov ${PVTI:#x}, %esi
    mov ${RESULTS + 0x40:#x}, %edi
    mov $32, %ecx
    rep movsb
    mov ${WALL:#x}, %esi
    mov ${RESULTS + 0x80:#x}, %edi
    mov $12, %ecx
    rep movsb
    """
)


def pages_as_the_guest_saw_them(hv):
    run = run_system_guest(hv, COPY_PAGES, [])
    assert run.exits == [exits.Hlt()], run.exits
    guest_tsc = struct.unpack_from("<Q", run.results)[0]
    pvti = PVCLOCK_VCPU_TIME_INFO.unpack_from(run.results, 0x40)
    wall = PVCLOCK_WALL_CLOCK.unpack_from(run.results, 0x80)
    return guest_tsc, pvti, wall


@pytest.mark.kvm
def test_kvmclock_pages_as_kvm_fills_them(kvm_hv, model_hv):
    """The same guest on both: each fills the pages it is given (layout, even versions, a scale
    whose frequency converts the guest's own TSC into a time after system_time), and the wall clock
    plus kvmclock is now on both."""
    for hv in (kvm_hv, model_hv):
        guest_tsc, (version, _, tsc_timestamp, system_time, mul, shift, flags), wall = (
            pages_as_the_guest_saw_them(hv)
        )
        assert version % 2 == 0 and version > 0, hv.name
        assert 0 < mul < 1 << 32 and -32 < shift < 32, hv.name
        khz = pvclock_tsc_khz(mul, shift)
        assert 100_000 <= khz <= 10_000_000, (hv.name, khz)  # 100 MHz .. 10 GHz
        assert tsc_timestamp <= guest_tsc, hv.name
        wall_version, sec, nsec = wall
        assert wall_version % 2 == 0 and wall_version > 0 and nsec < 10**9, hv.name
        guest_ns = system_time + pvclock_scale_delta(guest_tsc - tsc_timestamp, mul, shift)
        assert abs(sec * 10**9 + nsec + guest_ns - time.time_ns()) < 60 * 10**9, hv.name
