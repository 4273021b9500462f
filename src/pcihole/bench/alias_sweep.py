"""ro-alias's two host-side knobs, swept on the default machine: the alias granule and prefault.

The granule is the size of the fill memfd that the arena repeats (one host mapping each): 4 KiB
costs one page of backing but 65,536 mappings for a 256 MiB hole (more than the planner's mapping
budget allows, so the hole is cut into several memslots over a smaller arena); 2 MiB costs 2 MiB of
backing and 128 mappings. Prefault fills the host page tables of the backing when it is mapped
(HoleTuning), so that KVM's translation of the guest's first touch of a hole page takes no host
page fault. Each row is booted like the scan table's and counts what the choice costs: backing
bytes, mappings, memslots, host page faults during the run and the build's time, beside the scan
time; `ro-filled` with the same prefault setting is the floor each row is compared with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pcihole.bench.configs import Config
from pcihole.bench.plan import BenchPlan
from pcihole.bench.scan import Kernel, ScanRow, scan_default_machine
from pcihole.bench.summary import ratio
from pcihole.host.tsc import TscClock
from pcihole.machine.machinefile import MachineFile
from pcihole.machine.stop_request import StopRelay
from pcihole.memory import HoleTuning

PREFAULT_SETTINGS = (False, True)


@dataclass
class AliasSweepRow:
    #: None: the ro-filled floor (no granule)
    granule: int | None
    prefault: bool
    row: ScanRow
    #: scan time / the ro-filled scan with the same prefault setting on the same backend
    ratio_to_floor: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "granule": self.granule,
            "prefault": self.prefault,
            "ratio_to_floor": self.ratio_to_floor,
            **self.row.as_dict(),
        }


def sweep_points(plan: BenchPlan) -> Iterator[tuple[str, HoleTuning]]:
    """(strategy, tuning) in the order measured: the floor first, for each prefault setting."""
    for prefault in PREFAULT_SETTINGS:
        yield "ro-filled", HoleTuning(prefault=prefault)
        for granule in plan.alias_granules:
            yield "ro-alias", HoleTuning(prefault=prefault, alias_granule=granule)


def point_count(plan: BenchPlan) -> int:
    return sum(1 for _ in sweep_points(plan))


def measure_alias_sweep(
    spec: MachineFile,
    backend: str,
    plan: BenchPlan,
    kernel: Kernel,
    clock: TscClock,
    on_point: Callable[[str], None] = lambda what: None,
    stops: StopRelay | None = None,
) -> list[AliasSweepRow]:
    rows = []
    for strategy, tuning in sweep_points(plan):
        config = Config(backend, strategy)
        scan = scan_default_machine(
            spec, config, plan.alias_sweep_runs, kernel, clock, stops=stops, tuning=tuning
        )
        rows.append(AliasSweepRow(tuning.alias_granule, tuning.prefault, scan))
        on_point(f"{config.label}, granule {tuning.alias_granule}, prefault {tuning.prefault}")
    floors = {r.prefault: r.row.scan_seconds.median for r in rows if r.granule is None}
    for r in rows:
        r.ratio_to_floor = ratio(r.row.scan_seconds.median, floors.get(r.prefault))
    return rows
