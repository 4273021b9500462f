"""`MsrTable`: one model vCPU's model-specific registers, dispatched to the code that owns each.

KVM's kvm_get_msr_common / kvm_set_msr_common (arch/x86/kvm/x86.c) is one large switch; the
model's is a table instead, so that a device owns its MSRs without vcpu.py knowing it: the local
APIC registers IA32_APIC_BASE, the x2APIC range 0x800-0x8ff and IA32_TSC_DEADLINE, kvmclock its
MSRs, the vCPU its own (cpu_msrs.py). An MSR nobody registered is unknown: a guest RDMSR / WRMSR
of it takes #GP(0), as KVM with ignore_msrs=0 does (kvm_msr_ignored_check), and KVM_GET_MSRS /
KVM_SET_MSRS stop there (msr_io returns the number done).

A handler raises `MsrFault` for an access the CPU refuses (a reserved bit, a read-only MSR):
#GP(0) for the guest, the end of KVM_SET_MSRS for the VMM. `host` says who asks, as KVM's
`msr_info->host_initiated`: KVM_GET/SET_MSRS (True) may do what a guest may not (write a
read-only MSR to restore it).

MSRs the engine implements itself (EFER, STAR, LSTAR, FS / GS base, PAT reads, the MTRRs, ...)
never reach this table on a guest access: vcpu.py lets Unicorn's helper_rdmsr / helper_wrmsr do
them without a Python call (msr_intercept.py). They are registered here too (as `engine`
handlers) so that KVM_GET/SET_MSRS find them. Every other MSR is intercepted whether or not
anyone owns it, so a handler registered at any time, also while the vCPU runs, sees the guest's
next access.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

MSR_INDEX_LIMIT = 1 << 32

#: read(index, host) -> value
MsrRead = Callable[[int, bool], int]
#: write(index, value, host); raises MsrFault to refuse
MsrWrite = Callable[[int, int, bool], None]


class MsrFault(Exception):
    """The access is refused: #GP(0) for a guest RDMSR / WRMSR, a stop for KVM_GET/SET_MSRS."""


def no_write(index: int, value: int, host: bool) -> None:
    """A read-only MSR: a guest write takes #GP (host writes are refused too unless a handler says)."""
    raise MsrFault(f"MSR {index:#x} is read-only")


@dataclass(frozen=True)
class MsrHandler:
    """Who owns MSRs [first, last]: `read` and `write` (each may raise MsrFault)."""

    first: int
    last: int
    read: MsrRead
    write: MsrWrite
    owner: str
    #: The engine does guest accesses itself (no Python call); read / write are for the VMM.
    engine: bool = False


class MsrTable:
    """The MSRs of one vCPU: single indices and ranges, each with one handler."""

    def __init__(self) -> None:
        self._handlers: list[MsrHandler] = []  # sorted by first, never overlapping
        self._firsts: list[int] = []

    def register(
        self,
        first: int,
        last: int | None = None,
        *,
        read: MsrRead,
        write: MsrWrite = no_write,
        owner: str,
        engine: bool = False,
        replace: bool = False,
    ) -> MsrHandler:
        """Own MSRs [first, last] (one MSR when `last` is None). Overlaps are refused, naming both,
        unless `replace`: then the handlers wholly inside [first, last] are dropped first (a local
        APIC taking IA32_APIC_BASE over from the vCPU's default)."""
        last = first if last is None else last
        if not 0 <= first <= last < MSR_INDEX_LIMIT:
            raise ValueError(f"{owner}: MSR range [{first:#x}, {last:#x}] is not within 32-bit indices")
        if replace:
            for old in [h for h in self._handlers if first <= h.first and h.last <= last]:
                i = self._handlers.index(old)
                del self._handlers[i]
                del self._firsts[i]
        i = bisect.bisect_right(self._firsts, last)
        if i > 0 and self._handlers[i - 1].last >= first:
            other = self._handlers[i - 1]
            raise ValueError(
                f"{owner}: MSRs [{first:#x}, {last:#x}] overlap {other.owner}'s [{other.first:#x}, {other.last:#x}]"
            )
        handler = MsrHandler(first, last, read, write, owner, engine)
        self._handlers.insert(i, handler)
        self._firsts.insert(i, first)
        return handler

    def unregister(self, handler: MsrHandler) -> None:
        i = self._handlers.index(handler)
        del self._handlers[i]
        del self._firsts[i]

    def handler(self, index: int) -> MsrHandler | None:
        i = bisect.bisect_right(self._firsts, index) - 1
        if i >= 0 and self._handlers[i].last >= index:
            return self._handlers[i]
        return None

    def handlers(self) -> list[MsrHandler]:
        return list(self._handlers)

    def read(self, index: int, *, host: bool) -> int:
        """RDMSR (host=False) or KVM_GET_MSRS (host=True); MsrFault for an unknown MSR."""
        h = self.handler(index)
        if h is None:
            raise MsrFault(f"unknown MSR {index:#x}")
        return h.read(index, host) & 0xFFFFFFFFFFFFFFFF

    def write(self, index: int, value: int, *, host: bool) -> None:
        """WRMSR (host=False) or KVM_SET_MSRS (host=True); MsrFault for an unknown MSR."""
        h = self.handler(index)
        if h is None:
            raise MsrFault(f"unknown MSR {index:#x}")
        h.write(index, value & 0xFFFFFFFFFFFFFFFF, host)


class MsrValue:
    """A plain read/write MSR kept in Python, with the bits a write may set (others #GP)."""

    def __init__(self, value: int = 0, *, writable: int = (1 << 64) - 1) -> None:
        self.value = value
        self.writable = writable

    def read(self, index: int, host: bool) -> int:
        return self.value

    def write(self, index: int, value: int, host: bool) -> None:
        if value & ~self.writable:
            raise MsrFault(f"MSR {index:#x}: reserved bits in {value:#x}")
        self.value = value
