"""What a run cost, counted where it happens (the run loop and the dispatcher)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ExitCounts:
    mmio_read: int = 0
    mmio_write: int = 0
    io: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.mmio_read + self.mmio_write + self.io + self.other

    def as_dict(self) -> dict[str, int]:
        return {
            "mmio_read": self.mmio_read,
            "mmio_write": self.mmio_write,
            "io": self.io,
            "total": self.total,
        }


@dataclass
class RunStats:
    exits: ExitCounts = field(default_factory=ExitCounts)
    #: ECAM accesses that exited to pcihole, reads and writes (a subset of the exits above)
    ecam_exits: int = 0
    #: ...of which at a function that is not present (what the hole strategies exist to remove)
    ecam_absent_exits: int = 0
    #: the reads among them (with `exit`, every ECAM read the guest made; with a hole strategy, the
    #: reads of present functions only: absent functions answer without an exit)
    ecam_reads: int = 0
    #: the absent-function exits by (guest-physical address, size, "read" | "write"), so that a
    #: guest's probes can be compared with a prediction address by address (tests/linux/)
    ecam_absent_accesses: Counter[tuple[int, int, str]] = field(default_factory=Counter)
    #: guest writes that KVM appended to the coalesced-MMIO ring instead of exiting
    coalesced_writes: int = 0
    #: ports the guest touched that no device claims (each logged once)
    unclaimed_ports: set[int] = field(default_factory=set)
    unclaimed_mmio: set[int] = field(default_factory=set)
    #: port-I/O exits per port (the serial console, the PIT when not in the kernel, ...)
    io_by_port: Counter[int] = field(default_factory=Counter)
    #: port writes KVM appended to the coalesced ring instead of exiting (COM1's THR), per port
    io_coalesced_by_port: Counter[int] = field(default_factory=Counter)
    #: internal errors the host quirks fixed up and ran on (machine/host_quirks.py), by kind
    quirk_fixups: int = 0
    quirk_fixups_by_kind: Counter[str] = field(default_factory=Counter)
