"""vCPU exits as data.

`Vcpu.run()` on every backend only *decodes* the reason the vCPU stopped into one of the immutable
records below; deciding what to do about it is the machine layer's job (`machine/dispatch.py`).
This mirrors rust-vmm's `VcpuExit` enum and keeps exit handling testable with made-up exits.

Reads (`MmioRead`, `IoIn`) are completed by calling `Vcpu.complete_read(data)` before the next
`run()`, as KVM expects the data to be in `kvm_run` when KVM_RUN is re-entered.

The two exits a guest produces by the thousand (MMIO reads and writes: every config access under
the `exit` strategy) are NamedTuples, the others frozen dataclasses: both are immutable and match
the same class patterns, but a frozen dataclass is built through object.__setattr__ for each field,
three times the cost of a tuple (about 1 us more per exit on the software KVM hosts pcihole is
measured on: bench/exit_path.py). MmioRead and MmioWrite never compare equal (an int size against
bytes); unlike a dataclass, each equals a plain tuple of its fields. (Port I/O stays a dataclass:
a NamedTuple field cannot be called `count`, tuple's method.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class MmioRead(NamedTuple):
    """KVM_EXIT_MMIO with is_write = 0: the guest read `size` bytes at guest-physical `addr`."""

    addr: int
    size: int


class MmioWrite(NamedTuple):
    """KVM_EXIT_MMIO with is_write = 1: the guest wrote `data` (1 to 8 bytes) at `addr`."""

    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    """KVM_EXIT_IO, direction in: `count` reads of `size` bytes from `port`."""

    port: int
    size: int
    count: int = 1


@dataclass(frozen=True, slots=True)
class IoOut:
    """KVM_EXIT_IO, direction out: `count` writes of `size` bytes to `port`; `data` holds all of them."""

    port: int
    size: int
    data: bytes
    count: int = 1


@dataclass(frozen=True, slots=True)
class Hlt:
    """KVM_EXIT_HLT: the guest executed HLT (no in-kernel LAPIC, so KVM hands it to us)."""


@dataclass(frozen=True, slots=True)
class IrqWindowOpen:
    """KVM_EXIT_IRQ_WINDOW_OPEN: the VMM asked for it (request_interrupt_window) and the guest can now
    take an external interrupt (RFLAGS.IF set, no STI / MOV SS shadow)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted (or asked for a shutdown cycle)."""


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned EINTR (KVM_EXIT_INTR): a signal arrived; simply run again."""


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM_EXIT_INTERNAL_ERROR: KVM could not emulate something; `data` holds `ndata` words."""

    suberror: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class FailEntry:
    """KVM_EXIT_FAIL_ENTRY: hardware refused the guest state."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """KVM_EXIT_SYSTEM_EVENT (shutdown, reset, crash, ...)."""

    type: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Unknown:
    """Any exit reason pcihole does not decode; `reason` is the raw KVM_EXIT_* number."""

    reason: int


VcpuExit = (
    MmioRead
    | MmioWrite
    | IoIn
    | IoOut
    | Hlt
    | IrqWindowOpen
    | Shutdown
    | Interrupted
    | InternalError
    | FailEntry
    | SystemEvent
    | Unknown
)


@dataclass(frozen=True, slots=True)
class CoalescedWrite:
    """One entry of the coalesced-MMIO ring (struct kvm_coalesced_mmio): a write KVM did not exit for."""

    addr: int
    data: bytes
    pio: bool = False
