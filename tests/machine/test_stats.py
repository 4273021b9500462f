"""RunStats: the absent-function reads the C run loop answered are counted when they are read."""

from __future__ import annotations

from pcihole.machine.stats import RunStats


def test_deferred_reads_join_the_counted_ones_address_by_address():
    stats = RunStats()
    stats.ecam_absent_accesses[(0xE0008000, 4, "read")] += 1  # as EcamWindow counts an exit
    stats.defer_absent_reads(lambda: ([0xE0008000, 0xE0010000], [4, 2]))
    stats.defer_absent_reads(lambda: ([0xE0010000], [2]))
    stats.ecam_absent_accesses[(0xE0008000, 1, "write")] += 1  # adds the deferred reads first
    assert dict(stats.ecam_absent_accesses) == {
        (0xE0008000, 4, "read"): 2,
        (0xE0010000, 2, "read"): 2,
        (0xE0008000, 1, "write"): 1,
    }
    # Added once: reading again adds nothing.
    assert sum(stats.ecam_absent_accesses.values()) == 5
