"""How scan cost and hole memory grow, per strategy: with the ECAM (buses per segment x segments, one
host bridge per segment and nothing else present) and with the number of present functions (on one
256-bus segment). Machines come from `pcihole.pci.synthetic.generate`; each point is booted a few
times into the same `ScanRow` the scan table has (median scan time; counts do not vary between boots).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pcihole.bench.configs import Config
from pcihole.bench.plan import BenchPlan
from pcihole.bench.scan import Kernel, ScanRow, boot_and_scan, row_from_samples
from pcihole.host.tsc import TscClock
from pcihole.machine.machinefile import MachineFile
from pcihole.machine.stop_request import StopRelay
from pcihole.pci import ecam
from pcihole.pci.synthetic import generate

SWEEP_ECAM = "ecam"
SWEEP_FUNCTIONS = "functions"
#: Guest RAM of the synthetic machines (the guest needs < 1 MiB; the default machine has 64).
RAM_MIB = 64
FULL_SEGMENT_BUSES = ecam.MAX_BUS + 1


@dataclass(frozen=True)
class Shape:
    buses: int
    segments: int
    functions: int

    @property
    def ecam_bytes(self) -> int:
        return self.buses * self.segments * ecam.BUS_WINDOW_SIZE

    def machine(self) -> MachineFile:
        name = f"synthetic {self.functions} functions, {self.segments} x {self.buses} buses"
        return MachineFile(path=f"<{name}>", name=name, ram_mib=RAM_MIB, topology=generate(
            self.functions, buses=self.buses, segments=self.segments))  # fmt: skip


@dataclass
class ScalingPoint:
    """One point of a sweep: the machine's shape and what booting it cost (a scan-table row)."""

    sweep: str
    shape: Shape
    row: ScanRow

    def as_dict(self) -> dict[str, object]:
        shape = {
            "buses": self.shape.buses,
            "segments": self.shape.segments,
            "functions": self.shape.functions,
            "ecam_bytes": self.shape.ecam_bytes,
        }
        return {"sweep": self.sweep, **shape, **self.row.as_dict()}


def shapes(plan: BenchPlan) -> Iterator[tuple[str, Shape]]:
    for segments in plan.segment_counts:
        for buses in plan.bus_counts:
            yield SWEEP_ECAM, Shape(buses, segments, functions=segments)
    for functions in plan.function_counts:
        yield SWEEP_FUNCTIONS, Shape(FULL_SEGMENT_BUSES, 1, functions)


def point_count(plan: BenchPlan) -> int:
    return sum(1 for _ in shapes(plan))


def measure_scaling(
    config: Config,
    plan: BenchPlan,
    kernel: Kernel,
    clock: TscClock,
    on_point: Callable[[str], None] = lambda what: None,
    stops: StopRelay | None = None,
) -> list[ScalingPoint]:
    points = []
    for sweep, shape in shapes(plan):
        spec = shape.machine()
        samples = [boot_and_scan(spec, config, kernel, clock, stops) for _ in range(plan.scaling_runs)]
        points.append(ScalingPoint(sweep, shape, row_from_samples(config, samples)))
        on_point(f"{config.label}: {shape.functions} functions, {shape.segments} x {shape.buses} buses")
    return points
