"""The `exit` strategy against QEMU, boot by boot in turn: the scan, and one config read's cost.

Both take one exit per config read; the scan table's rows are each measured in a block of boots,
minutes apart, and on a shared host the load moves in between. Here one round is one boot of each
in a row (kvm `exit` with the default run loop, the same with the Python loop, QEMU q35 on the same
/dev/kvm), the scan timed by the guest's TSC as in the scan table, and each round gives its own
ratios to QEMU: their median is the figure to quote, with the medians of the times beside it.

The same boots measure what one config read costs (exit_cost.py): after its scan the guest times
`pcihole.exitloop=N` reads of an absent function, of a present one and of RAM. That loop runs after
the timed scan and costs each boot a fraction of a second against QEMU's seconds of firmware, so a
round gives both figures for the price of one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pcihole.bench.configs import Config
from pcihole.bench.exit_cost import (
    DEFAULT_LOOP_LABEL,
    PYTHON_LOOP_LABEL,
    QEMU_LABEL,
    ExitCost,
    ExitLoopSample,
    exit_cost_of,
    exit_loop_option,
    sample_of,
)
from pcihole.bench.qemu_peer import QEMU_GUEST_CMDLINE, boot_on_qemu
from pcihole.bench.scan import GUEST_CMDLINE, Kernel, boot_and_scan
from pcihole.bench.summary import Summary
from pcihole.host.tsc import TscClock
from pcihole.machine.machinefile import MachineFile
from pcihole.machine.stop_request import StopRelay


@dataclass
class ExitVsQemu:
    rounds: int
    #: the loop the default configuration ran ("c", or "python" where the C loop cannot be built)
    default_loop: str
    #: scan seconds: kvm `exit` with the default loop, with the Python loop, and QEMU
    default_loop_seconds: Summary
    python_loop_seconds: Summary
    qemu_seconds: Summary
    #: medians over the rounds of each round's ratio to QEMU
    default_loop_over_qemu: float
    python_loop_over_qemu: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def measure_exit_vs_qemu(
    spec: MachineFile,
    rounds: int,
    exit_loop_reads: int,
    kernel: Kernel,
    clock: TscClock,
    stops: StopRelay | None = None,
    on_round: Callable[[], None] = lambda: None,
) -> tuple[ExitVsQemu, ExitCost]:
    option = exit_loop_option(exit_loop_reads)
    default: list[float] = []
    python: list[float] = []
    qemu: list[float] = []
    loops: dict[str, list[ExitLoopSample]] = {DEFAULT_LOOP_LABEL: [], PYTHON_LOOP_LABEL: [], QEMU_LABEL: []}
    loop = ""
    for _ in range(max(rounds, 1)):
        for config, seconds in (
            (Config("kvm", "exit"), default),
            (Config("kvm", "exit", run_loop="python"), python),
        ):
            sample = boot_and_scan(spec, config, kernel, clock, stops, cmdline=f"{GUEST_CMDLINE} {option}")
            seconds.append(sample.scan_seconds)
            label = PYTHON_LOOP_LABEL if config.run_loop == "python" else DEFAULT_LOOP_LABEL
            loops[label].append(sample_of(sample.exit_loop, exit_loop_reads, clock, config.label))
            if label == DEFAULT_LOOP_LABEL:
                loop = sample.run_loop
        boot = boot_on_qemu(spec, stops, cmdline=f"{QEMU_GUEST_CMDLINE} {option}")
        qemu.append(clock.seconds(boot.scan_tsc))
        loops[QEMU_LABEL].append(sample_of(boot.serial.exit_loop, exit_loop_reads, clock, "QEMU"))
        on_round()
    vs_qemu = ExitVsQemu(
        rounds=len(qemu),
        default_loop=loop,
        default_loop_seconds=Summary.of(default),
        python_loop_seconds=Summary.of(python),
        qemu_seconds=Summary.of(qemu),
        default_loop_over_qemu=statistics.median(d / q for d, q in zip(default, qemu, strict=True)),
        python_loop_over_qemu=statistics.median(p / q for p, q in zip(python, qemu, strict=True)),
    )
    cost = exit_cost_of(
        exit_loop_reads,
        {
            DEFAULT_LOOP_LABEL: (loop, loops[DEFAULT_LOOP_LABEL]),
            PYTHON_LOOP_LABEL: ("python", loops[PYTHON_LOOP_LABEL]),
            QEMU_LABEL: ("", loops[QEMU_LABEL]),
        },
    )
    return vs_qemu, cost
