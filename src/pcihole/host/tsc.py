"""The TSC frequency, to turn the guest's scan ticks (`pcihole_timing`) into seconds.

Under KVM a guest's TSC counts at the host's TSC rate unless the VMM sets another (neither pcihole
nor QEMU here does), so the host's rate converts both columns. It is measured, not trusted: the host
reads its own TSC (a 10-byte function in an executable page, called through ctypes) across a stretch
of `time.perf_counter_ns`. /proc/cpuinfo's "cpu MHz" is kept beside it as a cross-check; it is the
fallback where the host cannot run that code (not x86-64, or no executable anonymous pages).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import time
from dataclasses import asdict, dataclass

# uint64_t rdtsc(void) for the x86-64 System V ABI:
#   0f 31         rdtsc              ; edx:eax = TSC
#   48 c1 e2 20   shl  rdx, 32
#   48 09 d0      or   rax, rdx
#   c3            ret
_RDTSC_X86_64 = bytes.fromhex("0f31 48c1e220 4809d0 c3")
CALIBRATION_SECONDS = 0.2


@dataclass(frozen=True)
class TscClock:
    hz: float
    #: "measured" (host TSC against perf_counter) or "cpuinfo" (the fallback)
    source: str
    #: /proc/cpuinfo's "cpu MHz" in Hz, for comparison (None if absent)
    cpuinfo_hz: float | None

    def seconds(self, ticks: int) -> float:
        return ticks / self.hz

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def cpuinfo_hz(path: str = "/proc/cpuinfo") -> float | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6
    except (OSError, ValueError, IndexError):
        pass
    return None


class _HostRdtsc:
    """The host's RDTSC as a Python callable (kept alive with its page)."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_RDTSC_X86_64)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self.read = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)


def measure_host_tsc_hz(seconds: float = CALIBRATION_SECONDS) -> float:
    """Host TSC ticks per second of perf_counter, over `seconds` (raises OSError/ValueError if it cannot)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise ValueError(f"no RDTSC on {platform.machine()}")
    host = _HostRdtsc()  # the page must outlive every call
    rdtsc = host.read
    t0, c0 = time.perf_counter_ns(), rdtsc()
    while time.perf_counter_ns() - t0 < seconds * 1e9:
        pass
    t1, c1 = time.perf_counter_ns(), rdtsc()
    return (c1 - c0) / ((t1 - t0) / 1e9)


class TscUnknown(RuntimeError):
    """Neither RDTSC nor /proc/cpuinfo tells the TSC frequency here."""


@functools.cache
def tsc_clock() -> TscClock:
    """The host's TSC clock, measured once per process (CALIBRATION_SECONDS of busy waiting)."""
    reference = cpuinfo_hz()
    try:
        return TscClock(measure_host_tsc_hz(), "measured", reference)
    except (OSError, ValueError):
        if reference is None:
            raise TscUnknown(
                "cannot tell the TSC frequency: no RDTSC here and no 'cpu MHz' in /proc/cpuinfo"
            ) from None
        return TscClock(reference, "cpuinfo", reference)
