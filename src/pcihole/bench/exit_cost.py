"""What one config read costs on pcihole's `exit` and on QEMU, measured by the same guest on both.

A whole scan blurs the exit's cost: the guest's own work is a large part of it (the floor scan,
with no exit for absent functions, is about 40% of the `exit` scan here), and the host's load moves
between boots. So the scan guest, with `pcihole.exitloop=N` on its command line, also times N
4-byte reads of offset 0 of the first absent function its scan found, N of the first present one
(the host bridge 00:00.0, on q35 and on pcihole's machines) and N of a RAM word, with its own TSC
(src/pcihole/guest/README.md). On a VMM that traps ECAM each config read is one exit, so

    seconds per read = (ticks of N config reads - ticks of N RAM reads) / N / TSC Hz

is the exit's round trip as the guest sees it, its loop taken out, on pcihole and on QEMU alike
(the same image, the same clock: the bench's TscClock). The boots are those of exit_vs_qemu.py's
alternated rounds (kvm `exit` with the default run loop, with the Python loop, QEMU q35), which
time the scan too; each round gives each VMM's ratio to QEMU, and the median of those ratios is the
figure to quote.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from pcihole.bench.errors import BenchError
from pcihole.bench.summary import Summary
from pcihole.guest.report import ExitLoop
from pcihole.host.tsc import TscClock

#: The guest's option (scan.c parse_cmdline): N timed reads of each kind after the scan.
EXIT_LOOP_OPTION = "pcihole.exitloop"
#: The rows, labelled as in the scan table; QEMU's is the one every row is compared with.
DEFAULT_LOOP_LABEL = "kvm / exit"
PYTHON_LOOP_LABEL = "kvm / exit (Python loop)"
QEMU_LABEL = "qemu / exit"


def exit_loop_option(reads: int) -> str:
    return f"{EXIT_LOOP_OPTION}={reads}"


@dataclass(frozen=True)
class ExitLoopSample:
    """One boot's exitloop line, in seconds per read (the RAM loop's own time taken out)."""

    absent_seconds: float
    present_seconds: float
    #: one iteration of the guest's loop over RAM: what was taken out of the other two
    ram_seconds: float
    absent_address: int
    present_address: int


def sample_of(loop: ExitLoop | None, reads: int, clock: TscClock, what: str) -> ExitLoopSample:
    """The boot's exitloop line in seconds; BenchError if the line is missing or incomplete."""
    if loop is None:
        raise BenchError(f"{what}: no exitloop line (is scan.elf older than {EXIT_LOOP_OPTION}?)")
    absent, present = loop.absent_ticks_per_read(), loop.present_ticks_per_read()
    if loop.reads != reads or absent is None or present is None:
        raise BenchError(
            f"{what}: the exitloop line has {loop.reads} reads (asked {reads}), absent function at "
            f"{loop.absent_addr:#x}, present at {loop.present_addr:#x} (0: the scan found none)"
        )
    if absent <= 0 or present <= 0:
        # Every config read exits on these VMMs: one that costs no more than a RAM read did not.
        raise BenchError(f"{what}: config reads took no longer than RAM reads ({loop}): did they exit?")
    return ExitLoopSample(
        absent_seconds=absent / clock.hz,
        present_seconds=present / clock.hz,
        ram_seconds=clock.seconds(loop.ram_tsc) / loop.reads,
        absent_address=loop.absent_addr,
        present_address=loop.present_addr,
    )


@dataclass
class ExitCostRow:
    """One VMM (and run loop) over the rounds."""

    label: str
    #: "c" or "python" for pcihole (the loop that ran), "" for QEMU
    run_loop: str
    #: the ECAM addresses read (q35's MMCONFIG is not where pcihole's default machine has its ECAM)
    absent_address: int
    present_address: int
    absent_seconds_per_read: Summary
    present_seconds_per_read: Summary
    ram_seconds_per_read: Summary
    #: medians over the rounds of this row's ratio to QEMU's in the same round (1.0 for QEMU)
    absent_over_qemu: float
    present_over_qemu: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class ExitCost:
    rounds: int
    #: reads of each kind per boot (the N of pcihole.exitloop=N)
    reads: int
    rows: list[ExitCostRow] = field(default_factory=list)

    def row(self, label: str) -> ExitCostRow | None:
        return next((r for r in self.rows if r.label == label), None)

    def as_dict(self) -> dict[str, object]:
        return {"rounds": self.rounds, "reads": self.reads, "rows": [r.as_dict() for r in self.rows]}


def exit_cost_of(reads: int, samples: dict[str, tuple[str, list[ExitLoopSample]]]) -> ExitCost:
    """The section from the rounds: label -> (run loop, one sample per round, in round order);
    QEMU_LABEL must be among them, with as many rounds as every other row."""
    _, qemu = samples[QEMU_LABEL]
    rows = []
    for label, (run_loop, row_samples) in samples.items():
        last = row_samples[-1]
        pairs = list(zip(row_samples, qemu, strict=True))
        rows.append(
            ExitCostRow(
                label=label,
                run_loop=run_loop,
                absent_address=last.absent_address,
                present_address=last.present_address,
                absent_seconds_per_read=Summary.of([s.absent_seconds for s in row_samples]),
                present_seconds_per_read=Summary.of([s.present_seconds for s in row_samples]),
                ram_seconds_per_read=Summary.of([s.ram_seconds for s in row_samples]),
                absent_over_qemu=statistics.median(s.absent_seconds / q.absent_seconds for s, q in pairs),
                present_over_qemu=statistics.median(s.present_seconds / q.present_seconds for s, q in pairs),
            )
        )
    return ExitCost(rounds=len(qemu), reads=reads, rows=rows)
