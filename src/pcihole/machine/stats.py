"""What a run cost, counted where it happens (the run loop and the dispatcher)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat

#: How many returns of the C run loop may wait, undecoded, before RunStats counts them: each holds
#: a copy of the loop's log (16 KiB at most), so without a bound a guest that reads absent
#: functions for hours would grow pcihole by about 1 MB a second. 256 waiting logs are 4 MiB at
#: most; a scan's few hundred thousand reads fold once or not at all.
MAX_DEFERRED_LOGS = 256


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
    #: guest's probes can be compared with a prediction address by address (tests/linux/); read it
    #: through `ecam_absent_accesses`, which adds the reads the C run loop answered first
    _absent_accesses: Counter[tuple[int, int, str]] = field(default_factory=Counter, repr=False)
    #: the C run loop's answered reads not yet in `_absent_accesses`: what gives their addresses
    #: and sizes, one per return of the loop
    _absent_reads_to_add: list[Callable[[], tuple[list[int], list[int]]]] = field(
        default_factory=list, repr=False, compare=False
    )
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

    @property
    def ecam_absent_accesses(self) -> Counter[tuple[int, int, str]]:
        if self._absent_reads_to_add:
            self._add_absent_reads()
        return self._absent_accesses

    def defer_absent_reads(self, decode: Callable[[], tuple[list[int], list[int]]]) -> None:
        """Absent-function reads answered by the C run loop, counted in `ecam_absent_accesses` the
        next time somebody reads it. Counting a read address by address costs a few hundred ns on a
        vCPU thread just back from KVM_RUN (cold caches), about 2% of an `exit` scan if it were done
        at every return of the C loop; the run's other counts are kept exact at every return.
        `decode` gives their addresses and sizes (two lists in the order of the reads). Once
        MAX_DEFERRED_LOGS wait, they are counted at once, so what waits stays bounded."""
        waiting = self._absent_reads_to_add
        waiting.append(decode)
        if len(waiting) >= MAX_DEFERRED_LOGS:
            self._add_absent_reads()

    def _add_absent_reads(self) -> None:
        accesses = self._absent_accesses
        for decode in self._absent_reads_to_add:
            addresses, sizes = decode()
            # Counter.update counts an iterable in C (collections._count_elements).
            accesses.update(zip(addresses, sizes, repeat("read")))
        self._absent_reads_to_add.clear()
