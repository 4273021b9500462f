"""exit_cost.py: the guest's exitloop lines turned into the bench's "Exit cost, same guest" section,
on made-up lines (the real ones are measured by `pcihole bench`, never asserted)."""

from __future__ import annotations

import re

import pytest

from pcihole.bench.configs import Configs
from pcihole.bench.errors import BenchError
from pcihole.bench.exit_cost import (
    DEFAULT_LOOP_LABEL,
    QEMU_LABEL,
    ExitCost,
    exit_cost_of,
    exit_loop_option,
    sample_of,
)
from pcihole.bench.host import HostInfo
from pcihole.bench.plan import QUICK
from pcihole.bench.report import exit_cost_table, scan_table
from pcihole.bench.results import BenchResults
from pcihole.guest.report import ExitLoop
from pcihole.host.tsc import TscClock

CLOCK = TscClock(hz=1e9, source="test", cpuinfo_hz=None)  # 1 tick = 1 ns
READS = 1000


def line(absent_ns: int, present_ns: int, ram_ns: int = 500, base: int = 0xE0000000) -> ExitLoop:
    """An exitloop line whose reads cost these many ns each (RAM's included)."""
    return ExitLoop(READS, base + 0x8000, absent_ns * READS, base, present_ns * READS, ram_ns * READS)


def test_a_sample_takes_the_ram_loop_out_of_each_read():
    s = sample_of(line(8500, 12500), READS, CLOCK, "kvm")
    assert s.absent_seconds == pytest.approx(8e-6) and s.present_seconds == pytest.approx(12e-6)
    assert s.ram_seconds == pytest.approx(0.5e-6)
    assert (s.absent_address, s.present_address) == (0xE0008000, 0xE0000000)


@pytest.mark.parametrize(
    ("loop", "message"),
    [
        (None, "no exitloop line"),
        (ExitLoop(READS, 0, 0, 0xE0000000, 10**7, 10**5), "absent function at 0x0"),
        (ExitLoop(READS + 1, 0xE0008000, 10**7, 0xE0000000, 10**7, 10**5), "1001 reads (asked 1000)"),
        (line(400, 9000), "no longer than RAM reads"),  # a read that did not exit
    ],
)
def test_a_missing_or_incomplete_line_is_a_bench_error(loop, message):
    with pytest.raises(BenchError, match=re.escape(message)):
        sample_of(loop, READS, CLOCK, "kvm / exit")


def test_the_ratios_to_qemu_are_the_medians_of_each_rounds():
    kvm = [line(a, p) for a, p in ((8500, 12500), (10500, 9500), (6500, 20500))]
    qemu = [line(a, p, base=0xB0000000) for a, p in ((8500, 6500), (5500, 6500), (12500, 6500))]
    cost = exit_cost_of(
        READS,
        {
            DEFAULT_LOOP_LABEL: ("c", [sample_of(x, READS, CLOCK, "kvm") for x in kvm]),
            QEMU_LABEL: ("", [sample_of(x, READS, CLOCK, "qemu") for x in qemu]),
        },
    )
    assert isinstance(cost, ExitCost) and (cost.rounds, cost.reads) == (3, READS)
    row, q = cost.row(DEFAULT_LOOP_LABEL), cost.row(QEMU_LABEL)
    assert row is not None and q is not None
    # rounds' ratios 1.0, 2.0, 0.5 (absent) and 2.0, 1.5, 3.3 (present): medians 1.0 and 2.0
    assert row.absent_over_qemu == pytest.approx(1.0) and row.present_over_qemu == pytest.approx(2.0)
    assert row.absent_seconds_per_read.median == pytest.approx(8e-6)
    assert (q.absent_over_qemu, q.present_over_qemu) == (1.0, 1.0)
    assert (row.run_loop, q.run_loop, q.absent_address) == ("c", "", 0xB0008000)
    assert cost.as_dict()["rows"][0]["absent_seconds_per_read"]["n"] == 3


def test_the_option_is_the_guests():
    assert exit_loop_option(20000) == "pcihole.exitloop=20000"


def test_failed_rounds_are_reported_as_such_not_as_a_missing_qemu_row():
    # The QEMU row was measured; then a boot of the rounds failed (here pcihole's exitloop line).
    results = BenchResults(
        plan=QUICK,
        host=HostInfo("cpu", 2, "6.1", "kvm", "3.12", "QEMU 8.2"),
        clock=CLOCK,
        configs=Configs(),
        started="2026-01-01T00:00:00Z",
    )
    results.alternated_skipped = "a boot of the rounds failed: kvm / exit: no exitloop line"
    assert not any("no QEMU row" in text for text in scan_table(results))
    assert exit_cost_table(results) == [f"Not measured: {results.alternated_skipped}."]
    assert results.as_json()["alternated_skipped"] == results.alternated_skipped
