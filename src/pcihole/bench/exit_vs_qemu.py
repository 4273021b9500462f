"""The `exit` strategy against QEMU, boot by boot in turn.

Both take one exit per config read; the scan table's rows are each measured in a block of boots,
minutes apart, and on a shared host the load moves in between. Here one round is one boot of each
in a row (kvm `exit` with the default run loop, the same with the Python loop, QEMU q35 on the same
/dev/kvm), the scan timed by the guest's TSC as in the scan table, and each round gives its own
ratios to QEMU: their median is the figure to quote, with the medians of the times beside it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pcihole.bench.configs import Config
from pcihole.bench.qemu_peer import scan_on_qemu
from pcihole.bench.scan import Kernel, boot_and_scan
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
    kernel: Kernel,
    clock: TscClock,
    stops: StopRelay | None = None,
    on_round: Callable[[], None] = lambda: None,
) -> ExitVsQemu:
    default, python, qemu = [], [], []
    loop = ""
    for _ in range(max(rounds, 1)):
        sample = boot_and_scan(spec, Config("kvm", "exit"), kernel, clock, stops)
        default.append(sample.scan_seconds)
        loop = sample.run_loop
        python.append(
            boot_and_scan(spec, Config("kvm", "exit", run_loop="python"), kernel, clock, stops).scan_seconds
        )
        qemu.append(scan_on_qemu(spec, 1, clock, stops=stops).scan_seconds.median)
        on_round()
    return ExitVsQemu(
        rounds=len(qemu),
        default_loop=loop,
        default_loop_seconds=Summary.of(default),
        python_loop_seconds=Summary.of(python),
        qemu_seconds=Summary.of(qemu),
        default_loop_over_qemu=statistics.median(d / q for d, q in zip(default, qemu, strict=True)),
        python_loop_over_qemu=statistics.median(p / q for p, q in zip(python, qemu, strict=True)),
    )
