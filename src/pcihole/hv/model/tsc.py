"""`TscClock`: the model vCPU's time-stamp counter, a fixed frequency over the host's monotonic clock.

KVM's guest TSC is the host TSC scaled to the vCPU's `virtual_tsc_khz` plus a per-vCPU offset
(kvm_read_l1_tsc: `kvm_scale_tsc(host_tsc, ratio) + tsc_offset`), and it keeps counting while the
vCPU is outside KVM_RUN. The model has no host TSC it can scale exactly (the host's TSC frequency
is not published to userspace), so its guest TSC is the host's CLOCK_MONOTONIC scaled to a fixed
frequency, plus the offset:

    guest_tsc(t) = (t - epoch_ns) * khz // 1_000_000 + offset

- RDTSC / RDTSCP and RDMSR(IA32_TSC) read it (instruction_hooks.py); WRMSR(IA32_TSC) and KVM_SET_MSRS move the
  offset so that the counter reads the value written (kvm_synchronize_tsc / kvm_vcpu_write_tsc_offset);
  IA32_TSC_ADJUST adds to the offset and to itself (SDM Vol. 3B 17.17.3).
- A device that arms a deadline in TSC units (the LAPIC's TSC-deadline timer, MSR 0x6e0) converts it
  into a host monotonic time with `host_ns_at(deadline)` (KVM's start_sw_tscdeadline: the deadline
  minus the guest TSC now, scaled by virtual_tsc_khz, from ktime_get()).
- kvmclock (kvmclock.py) publishes `khz` to Linux, which then takes it as tsc_khz with no
  calibration loop (kvm_get_tsc_khz).

All methods are safe from any thread (a timer thread converts deadlines while the vCPU writes the
offset): the offset is one int, replaced atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable

NS_PER_MS = 1_000_000

#: 1 GHz: one guest TSC tick per host nanosecond, so the guest TSC has the host clock's resolution
#: and a deadline converts without rounding. Any frequency works; Linux learns it from kvmclock.
DEFAULT_TSC_KHZ = 1_000_000

TSC_MASK = (1 << 64) - 1


class TscClock:
    """One vCPU's TSC: `khz` ticks per millisecond of the host's monotonic clock, plus an offset."""

    def __init__(self, khz: int = DEFAULT_TSC_KHZ, *, now_ns: Callable[[], int] = time.monotonic_ns) -> None:
        if khz <= 0:
            raise ValueError(f"TSC frequency {khz} kHz: must be positive")
        self.khz = khz
        self._now_ns = now_ns
        self._epoch_ns = now_ns()  # the guest TSC reads 0 here, as after KVM's vCPU creation
        self._offset = 0
        self._adjust = 0  # IA32_TSC_ADJUST

    # --- reading -----------------------------------------------------------------------------------

    @property
    def epoch_ns(self) -> int:
        """The host monotonic time at which this TSC read 0 before any write (its creation)."""
        return self._epoch_ns

    def now_ns(self) -> int:
        """The host's monotonic time, in ns, of the clock this TSC counts."""
        return self._now_ns()

    def _ticks(self, host_ns: int) -> int:
        return (host_ns - self._epoch_ns) * self.khz // NS_PER_MS

    def read(self, host_ns: int | None = None) -> int:
        """The guest TSC at host monotonic time `host_ns` (now if None), modulo 2**64."""
        t = self._now_ns() if host_ns is None else host_ns
        return (self._ticks(t) + self._offset) & TSC_MASK

    def host_ns_at(self, tsc: int) -> int:
        """The host monotonic time (ns) at which the guest TSC reaches `tsc` (the past if it has:
        a deadline already reached fires at once). Rounded up: the deadline is never early."""
        ticks = tsc - self._offset
        return self._epoch_ns + -(-ticks * NS_PER_MS // self.khz)

    def ns_until(self, tsc: int) -> int:
        """Nanoseconds from now until the guest TSC reaches `tsc` (0 if it has)."""
        return max(0, self.host_ns_at(tsc) - self._now_ns())

    # --- writing -----------------------------------------------------------------------------------

    def write(self, value: int, host_ns: int | None = None) -> None:
        """WRMSR(IA32_TSC) / KVM_SET_MSRS: the counter reads `value` at `host_ns` (now) and counts on."""
        t = self._now_ns() if host_ns is None else host_ns
        self._offset = (value & TSC_MASK) - self._ticks(t)

    @property
    def adjust(self) -> int:
        """IA32_TSC_ADJUST (SDM 17.17.3): what writes of IA32_TSC added, plus what the guest wrote."""
        return self._adjust & TSC_MASK

    def write_adjust(self, value: int) -> None:
        """WRMSR(IA32_TSC_ADJUST): the TSC moves by the difference (kvm_set_msr_common,
        MSR_IA32_TSC_ADJUST: adjust_tsc_offset_guest(vcpu, data - vcpu->arch.ia32_tsc_adjust_msr))."""
        value &= TSC_MASK
        self._offset += value - self.adjust
        self._adjust = value

    def guest_write(self, value: int) -> None:
        """WRMSR(IA32_TSC) by the guest: as write(), and IA32_TSC_ADJUST takes the same step
        (kvm_set_msr_common, MSR_IA32_TSC: `adj = data - tsc now; ia32_tsc_adjust_msr += adj`)."""
        t = self._now_ns()
        before = self.read(t)
        self.write(value, t)
        self._adjust += (value & TSC_MASK) - before
