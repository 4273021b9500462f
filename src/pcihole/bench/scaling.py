"""How scan cost and hole memory grow, per strategy: with the ECAM (buses per segment x segments, one
host bridge per segment and nothing else present) and with the number of present functions (on one
256-bus segment). Machines come from `pcihole.pci.synthetic.generate`; each point is booted a few
times and the median scan time kept (counts and memory do not vary between boots).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pcihole.bench.configs import Config
from pcihole.bench.plan import BenchPlan
from pcihole.bench.scan import Kernel, ScanSample, boot_and_scan
from pcihole.bench.summary import Summary
from pcihole.host.tsc import TscClock
from pcihole.machine.machinefile import MachineFile
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
    backend: str
    strategy: str
    sweep: str
    buses: int
    segments: int
    functions: int
    ecam_bytes: int
    scan_seconds: Summary
    config_reads: int
    devices: int
    exits_total: int
    ecam_exits: int
    absent_exits: int
    hole_backing_bytes: int
    vm_pte_growth_bytes: int
    hole_mappings: int
    process_mappings_growth: int
    memslots: int

    def as_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["scan_seconds"] = self.scan_seconds.as_dict()
        return d


def shapes(plan: BenchPlan) -> Iterator[tuple[str, Shape]]:
    for segments in plan.segment_counts:
        for buses in plan.bus_counts:
            yield SWEEP_ECAM, Shape(buses, segments, functions=segments)
    for functions in plan.function_counts:
        yield SWEEP_FUNCTIONS, Shape(FULL_SEGMENT_BUSES, 1, functions)


def point_count(plan: BenchPlan) -> int:
    return sum(1 for _ in shapes(plan))


def _point(config: Config, sweep: str, shape: Shape, samples: list[ScanSample]) -> ScalingPoint:
    last = samples[-1]
    return ScalingPoint(
        backend=config.backend,
        strategy=config.strategy,
        sweep=sweep,
        buses=shape.buses,
        segments=shape.segments,
        functions=shape.functions,
        ecam_bytes=shape.ecam_bytes,
        scan_seconds=Summary.of([s.scan_seconds for s in samples]),
        config_reads=last.config_reads,
        devices=last.devices,
        exits_total=last.exits["total"],
        ecam_exits=last.ecam_exits,
        absent_exits=last.absent_exits,
        hole_backing_bytes=last.hole_backing_bytes,
        vm_pte_growth_bytes=last.vm_pte_growth_bytes,
        hole_mappings=last.hole_mappings,
        process_mappings_growth=last.process_mappings_growth,
        memslots=last.memslots,
    )


def measure_scaling(
    config: Config,
    plan: BenchPlan,
    kernel: Kernel,
    clock: TscClock,
    on_point: Callable[[str], None] = lambda what: None,
) -> list[ScalingPoint]:
    points = []
    for sweep, shape in shapes(plan):
        spec = shape.machine()
        samples = [boot_and_scan(spec, config, kernel, clock) for _ in range(plan.scaling_runs)]
        points.append(_point(config, sweep, shape, samples))
        on_point(f"{config.label}: {shape.functions} functions, {shape.segments} x {shape.buses} buses")
    return points
