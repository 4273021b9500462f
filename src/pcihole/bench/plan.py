"""How much to measure: the full run (for README numbers) and `--quick` (under a minute, every strategy)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class BenchPlan:
    name: str
    #: boots of the default machine per backend x strategy (median, min and max over these)
    scan_runs: int
    #: boots per scaling point (the median is plotted)
    scaling_runs: int
    #: ECAM sizes: bus counts per segment, times segment counts
    bus_counts: tuple[int, ...]
    segment_counts: tuple[int, ...]
    #: present functions (on one 256-bus segment)
    function_counts: tuple[int, ...]
    #: hot-add + hot-remove pairs per strategy
    hotplug_changes: int
    #: MMIO reads of the bare-loop guest (exit_path.py), and its VMs (the median is kept)
    exit_path_reads: int
    exit_path_runs: int
    #: QEMU boots of the scan table's row (each costs ~2-4 s of firmware around a ~0.1 s scan)
    qemu_runs: int
    #: rounds of kvm `exit` (both run loops) and QEMU booted in turn (exit_vs_qemu.py), and the reads
    #: of each kind the guest times in each boot (exit_cost.py). The host's load moves the figures by
    #: about 10% between boots, so the medians want rounds; a round costs one QEMU boot (3-10 s of
    #: SeaBIOS on a software KVM) and two pcihole boots (under half a second each), so --quick keeps one
    alternated_rounds: int
    exit_loop_reads: int
    #: ro-alias granules swept (alias_sweep.py), each with and without prefault, and boots per point
    alias_granules: tuple[int, ...] = ()
    alias_sweep_runs: int = 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


FULL = BenchPlan(
    name="full",
    scan_runs=9,
    scaling_runs=5,
    bus_counts=(1, 16, 64, 256),
    segment_counts=(1, 4),
    function_counts=(1, 16, 256, 1024),
    hotplug_changes=20,
    exit_path_reads=20000,
    exit_path_runs=5,
    qemu_runs=5,
    alternated_rounds=9,
    exit_loop_reads=20000,
    alias_granules=(4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 2 * MiB),
    alias_sweep_runs=3,
)

QUICK = BenchPlan(
    name="quick",
    scan_runs=2,
    scaling_runs=1,
    bus_counts=(1, 256),
    segment_counts=(1, 4),
    function_counts=(1, 256),
    hotplug_changes=3,
    exit_path_reads=2000,
    exit_path_runs=1,
    qemu_runs=1,
    alternated_rounds=1,
    exit_loop_reads=5000,
    alias_granules=(4 * KiB, 64 * KiB, 2 * MiB),
    alias_sweep_runs=1,
)


def plan_for(quick: bool) -> BenchPlan:
    return QUICK if quick else FULL
