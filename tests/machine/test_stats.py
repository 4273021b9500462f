"""RunStats: the absent-function reads the C run loop answered are counted when they are read."""

from __future__ import annotations

from pcihole.machine.stats import MAX_DEFERRED_LOGS, RunStats


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


def test_deferred_reads_are_counted_before_too_many_wait():
    # A guest that reads absent functions for hours must not grow pcihole without bound: the
    # waiting logs are counted once MAX_DEFERRED_LOGS of them wait, without anyone asking.
    stats = RunStats()
    decoded = []

    def log(i: int):
        def decode():
            decoded.append(i)
            return [0xE0000000 + 0x8000 * (i % 3)], [4]

        return decode

    for i in range(MAX_DEFERRED_LOGS * 2 + 1):
        stats.defer_absent_reads(log(i))
    assert len(decoded) == MAX_DEFERRED_LOGS * 2  # two full batches, the last one still waits
    assert decoded == sorted(decoded)  # in the order the loop returned
    counts = stats.ecam_absent_accesses
    assert len(decoded) == MAX_DEFERRED_LOGS * 2 + 1
    assert sum(counts.values()) == MAX_DEFERRED_LOGS * 2 + 1
    assert counts[(0xE0008000, 4, "read")] == len(range(1, MAX_DEFERRED_LOGS * 2 + 1, 3))
