"""`KvmClock`: KVM's paravirtual clock (pvclock) for one model vCPU, so that Linux knows the TSC
frequency without a calibration loop.

Why kvmclock and not CPUID leaf 0x15 / 0x16 or 0x40000010: Linux 6.1's kvmclock_init
(arch/x86/kernel/kvmclock.c) runs for a guest whose CPUID has the KVM signature and
KVM_FEATURE_CLOCKSOURCE2, and sets x86_platform.calibrate_tsc = kvm_get_tsc_khz, which forces
X86_FEATURE_TSC_KNOWN_FREQ and returns pvclock_tsc_khz() of this vCPU's pvclock page: tsc_init
then takes that value and skips both the PIT calibration (native_calibrate_tsc /
pit_hpet_ptimer_calibrate_cpu) and the later refinement. Leaf 0x15 is read by
native_calibrate_tsc only for Intel CPUs and only when the hypervisor has not replaced
calibrate_tsc; leaf 0x40000010 is VMware's and is read by Linux's VMware code only. kvmclock is
also what Linux uses for sched_clock and as a clocksource on KVM, so it is what KVM offers and
what the model offers (cpuid.py: CLOCKSOURCE, CLOCKSOURCE2, CLOCKSOURCE_STABLE_BIT).

The MSRs (arch/x86/kvm/x86.c kvm_set_msr_common):
- MSR_KVM_SYSTEM_TIME_NEW (and the old 0x12): bit 0 enables; the rest is the guest-physical
  address of a struct pvclock_vcpu_time_info, which the model fills at once and again after every
  TSC write (kvm_guest_time_update on KVM_REQ_CLOCK_UPDATE): version (odd while writing, then
  even), tsc_timestamp, system_time (ns since the vCPU's TSC epoch: the VM's kvmclock),
  tsc_to_system_mul / tsc_shift from kvm_get_time_scale(NSEC_PER_SEC, tsc_khz * 1000), flags =
  PVCLOCK_TSC_STABLE_BIT (KVM sets it when its master clock is in use; the model's TSC is one
  monotonic clock, so it always is).
- MSR_KVM_WALL_CLOCK_NEW (and the old 0x11): the guest-physical address of a struct
  pvclock_wall_clock, filled with the wall-clock time at kvmclock 0 (kvm_write_wall_clock).

The model's TSC is CLOCK_MONOTONIC scaled to a fixed frequency (tsc.py), so one publication stays
exact: there is no drift to correct and no periodic update.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from pcihole.hv.model.msr import MsrTable
from pcihole.hv.model.tsc import TscClock

MSR_KVM_WALL_CLOCK = 0x11
MSR_KVM_SYSTEM_TIME = 0x12
MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
KVM_SYSTEM_TIME_ENABLE = 1 << 0
PVCLOCK_TSC_STABLE_BIT = 1 << 0
NSEC_PER_SEC = 1_000_000_000

# struct pvclock_vcpu_time_info: u32 version, u32 pad0, u64 tsc_timestamp, u64 system_time,
# u32 tsc_to_system_mul, s8 tsc_shift, u8 flags, u8 pad[2] (32 bytes).
PVCLOCK_VCPU_TIME_INFO = struct.Struct("<IIQQIbBxx")
# struct pvclock_wall_clock: u32 version, u32 sec, u32 nsec (12 bytes).
PVCLOCK_WALL_CLOCK = struct.Struct("<III")


def kvm_get_time_scale(scaled_hz: int, base_hz: int) -> tuple[int, int]:
    """(shift, mul) such that ((ticks << shift or >> -shift) * mul) >> 32 converts base_hz ticks
    into scaled_hz ticks (arch/x86/kvm/x86.c kvm_get_time_scale, step for step)."""
    shift = 0
    tps64 = base_hz
    scaled64 = scaled_hz
    while tps64 > scaled64 * 2 or tps64 & 0xFFFFFFFF00000000:
        tps64 >>= 1
        shift -= 1
    tps32 = tps64 & 0xFFFFFFFF
    while tps32 <= scaled64 or scaled64 & 0xFFFFFFFF00000000:
        if scaled64 & 0xFFFFFFFF00000000 or tps32 & 0x80000000:
            scaled64 >>= 1
        else:
            tps32 <<= 1
        shift += 1
    return shift, (scaled64 << 32) // tps32  # div_frac


def pvclock_scale_delta(delta: int, mul: int, shift: int) -> int:
    """pvclock_scale_delta (arch/x86/include/asm/pvclock.h): what the guest computes."""
    delta = delta << shift if shift >= 0 else delta >> -shift
    return (delta * mul) >> 32


def pvclock_tsc_khz(mul: int, shift: int) -> int:
    """pvclock_tsc_khz (arch/x86/kernel/pvclock.c): the tsc_khz Linux derives from the page."""
    khz = (1_000_000 << 32) // mul
    return khz << -shift if shift < 0 else khz >> shift


class KvmClock:
    """The kvmclock MSRs of one vCPU and the pages they point at."""

    def __init__(
        self,
        tsc: TscClock,
        write_guest: Callable[[int, bytes], bool],
        read_guest: Callable[[int, int], bytes | None],
        *,
        realtime_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._tsc = tsc
        self._write_guest = write_guest
        self._read_guest = read_guest
        self._realtime_ns = realtime_ns
        self.system_time = 0  # the MSR's value (address | enable)
        self.wall_clock = 0
        self.shift, self.mul = kvm_get_time_scale(NSEC_PER_SEC, tsc.khz * 1000)

    def register(self, table: MsrTable) -> None:
        for index in (MSR_KVM_SYSTEM_TIME, MSR_KVM_SYSTEM_TIME_NEW):
            table.register(
                index, read=self._read_system_time, write=self._write_system_time, owner="kvmclock"
            )
        for index in (MSR_KVM_WALL_CLOCK, MSR_KVM_WALL_CLOCK_NEW):
            table.register(index, read=self._read_wall_clock, write=self._write_wall_clock, owner="kvmclock")

    def kvmclock_ns(self, host_ns: int) -> int:
        """The vCPU's kvmclock at host monotonic time `host_ns`: ns since its TSC's epoch (its
        creation), whatever the guest wrote to IA32_TSC since (get_kvmclock_ns)."""
        return host_ns - self._tsc.epoch_ns

    # --- MSR handlers ------------------------------------------------------------------------------

    def _read_system_time(self, index: int, host: bool) -> int:
        return self.system_time

    def _write_system_time(self, index: int, value: int, host: bool) -> None:
        # kvm_write_system_time: any value is accepted; bit 0 enables the page at value & ~1.
        self.system_time = value
        self.update()

    def _read_wall_clock(self, index: int, host: bool) -> int:
        return self.wall_clock

    def _write_wall_clock(self, index: int, value: int, host: bool) -> None:
        self.wall_clock = value
        self.write_wall_clock(value)

    # --- the pages ---------------------------------------------------------------------------------

    def update(self) -> None:
        """kvm_guest_time_update: publish (tsc_timestamp, system_time) now, if enabled."""
        if not self.system_time & KVM_SYSTEM_TIME_ENABLE:
            return
        gpa = self.system_time & ~KVM_SYSTEM_TIME_ENABLE
        now = self._tsc.now_ns()
        tsc_now = self._tsc.read(now)
        system_time = self.kvmclock_ns(now)
        old = self._read_guest(gpa, 4)
        version = struct.unpack("<I", old)[0] if old is not None else 0
        odd = (version + 1) | 1  # "guest_hv_clock->version = hv_clock.version = (... + 1) | 1"
        info = PVCLOCK_VCPU_TIME_INFO.pack(
            odd, 0, tsc_now, system_time, self.mul, self.shift, PVCLOCK_TSC_STABLE_BIT
        )
        # KVM writes the odd version first, then the rest, then the even version: a guest reading
        # meanwhile retries (pvclock_read_begin / pvclock_read_retry).
        if not self._write_guest(gpa, struct.pack("<I", odd)):
            return  # not RAM: KVM's gfn_to_pfn_cache refresh fails and nothing is written
        self._write_guest(gpa, info)
        self._write_guest(gpa, struct.pack("<I", odd + 1))

    def write_wall_clock(self, gpa: int) -> None:
        """kvm_write_wall_clock: the wall-clock time at which kvmclock read 0."""
        wall_ns = self._realtime_ns() - self.kvmclock_ns(self._tsc.now_ns())
        sec, nsec = divmod(wall_ns, NSEC_PER_SEC)
        old = self._read_guest(gpa, 4)
        version = (struct.unpack("<I", old)[0] if old is not None else 0) + 1
        version |= 1
        if not self._write_guest(gpa, PVCLOCK_WALL_CLOCK.pack(version, sec & 0xFFFFFFFF, nsec)):
            return
        self._write_guest(gpa, struct.pack("<I", version + 1))
