"""The few numbers the issue asks the benchmark to answer, per backend, from rows measured in one run:

- exits for absent functions with ro-alias and native (target: 0);
- hole memory of ro-alias against ro-filled for a 256-bus segment (target: at least 256x less);
- the full scan with the backend's best strategy (what `auto` picks): its speed-up over the `exit`
  strategy and over QEMU, and its ratio to the floor (the same scan with every hole backed by real
  memory, i.e. ro-filled);
- what pcihole adds to an exit (exit_path.py);
- on kvm, the `exit` strategy against QEMU (both take one exit per config read), with the default
  run loop (C, where it builds) and with the Python loop, and what a VMM that only re-enters KVM_RUN
  from Python (the bare loop) would take for the same scan: the floor scan plus one bare exit per
  config read. All depend on the host: QEMU's exit path is C;
- on kvm, one config read of an absent and of a present function with `exit` against the same read
  on QEMU, timed by the same guest (exit_cost.py): the exit alone, without the scan's own work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pcihole.bench.exit_cost import DEFAULT_LOOP_LABEL
from pcihole.bench.summary import quotient

if TYPE_CHECKING:
    from pcihole.bench.results import BenchResults


@dataclass
class HoleMemory:
    """ro-alias against ro-filled on the default machine's 256-bus segment."""

    ro_filled_bytes: int | None
    ro_alias_bytes: int | None
    #: ro-filled / ro-alias: how many times less memory the alias needs
    times_less: float | None
    ro_filled_vm_pte_growth_bytes: int | None
    ro_alias_vm_pte_growth_bytes: int | None
    ro_alias_host_mappings: int | None


@dataclass
class Headline:
    backend: str
    best_strategy: str
    #: strategy -> exits that landed in a hole page (ro-alias, native where they exist)
    absent_function_exits: dict[str, int | None] = field(default_factory=dict)
    hole_memory_256_bus_segment: HoleMemory | None = None
    best_scan_seconds: float | None = None
    speedup_over_exit: float | None = None
    #: kvm only: QEMU runs on the same /dev/kvm
    speedup_over_qemu: float | None = None
    ratio_to_floor: float | None = None
    exit_path_ratio: float | None = None
    #: the same, measured through the machine's run loop beside the bare loop in one process
    run_loop_ratio: float | None = None
    #: kvm: the run loop with the C loop against the bare C loop, and against the bare Python loop
    c_run_loop_ratio: float | None = None
    c_run_loop_over_python_bare: float | None = None
    #: kvm only: the `exit` strategy's scan / QEMU's scan (the default run loop: C where it builds)
    exit_over_qemu: float | None = None
    #: kvm only: the same with the Python loop
    exit_python_loop_over_qemu: float | None = None
    #: kvm only: both, booted in turn with QEMU (exit_vs_qemu.py): medians of each round's ratio
    exit_over_qemu_alternated: float | None = None
    exit_python_loop_over_qemu_alternated: float | None = None
    #: kvm only: (the floor scan + the `exit` row's ECAM exits x the bare loop's exit) / QEMU's scan
    bare_loop_over_qemu: float | None = None
    #: kvm only: one config read of an absent and of a present function with `exit` and the default
    #: run loop / the same read on QEMU, timed by the same guest in the same rounds (exit_cost.py):
    #: medians of each round's ratio
    absent_read_over_qemu: float | None = None
    present_read_over_qemu: float | None = None


def _time(results: BenchResults, backend: str, strategy: str) -> float | None:
    row = results.row(backend, strategy)
    return row.scan_seconds.median if row else None


def headline_for(results: BenchResults, backend: str) -> Headline:
    best = results.configs.auto[backend]
    headline = Headline(backend=backend, best_strategy=best)
    for strategy in ("ro-alias", "native"):
        row = results.row(backend, strategy)
        if row is not None:
            headline.absent_function_exits[strategy] = row.absent_exits
    filled, alias = results.row(backend, "ro-filled"), results.row(backend, "ro-alias")
    if filled is not None and alias is not None:
        headline.hole_memory_256_bus_segment = HoleMemory(
            ro_filled_bytes=filled.hole_backing_bytes,
            ro_alias_bytes=alias.hole_backing_bytes,
            times_less=quotient(filled.hole_backing_bytes, alias.hole_backing_bytes),
            ro_filled_vm_pte_growth_bytes=filled.vm_pte_growth_bytes,
            ro_alias_vm_pte_growth_bytes=alias.vm_pte_growth_bytes,
            ro_alias_host_mappings=alias.hole_mappings,
        )
    best_time = _time(results, backend, best)
    headline.best_scan_seconds = best_time
    headline.speedup_over_exit = quotient(_time(results, backend, "exit"), best_time)
    headline.ratio_to_floor = quotient(best_time, _time(results, backend, "ro-filled"))
    if backend == "kvm":
        headline.speedup_over_qemu = quotient(_time(results, "qemu", "exit"), best_time)
    exit_path = next((e for e in results.exit_path if e.backend == backend), None)
    headline.exit_path_ratio = exit_path.ratio if exit_path else None
    if exit_path is not None and exit_path.breakdown is not None:
        headline.run_loop_ratio = exit_path.breakdown.run_loop_ratio
        headline.c_run_loop_ratio = exit_path.breakdown.c_run_loop_ratio
        headline.c_run_loop_over_python_bare = exit_path.breakdown.c_run_loop_over_python_bare
    if backend == "kvm":
        qemu = _time(results, "qemu", "exit")
        headline.exit_over_qemu = quotient(_time(results, backend, "exit"), qemu)
        if results.exit_vs_qemu is not None:
            headline.exit_over_qemu_alternated = results.exit_vs_qemu.default_loop_over_qemu
            headline.exit_python_loop_over_qemu_alternated = results.exit_vs_qemu.python_loop_over_qemu
        cost = results.exit_cost.row(DEFAULT_LOOP_LABEL) if results.exit_cost is not None else None
        if cost is not None:
            headline.absent_read_over_qemu = cost.absent_over_qemu
            headline.present_read_over_qemu = cost.present_over_qemu
        python_row = results.row(backend, "exit", run_loop="python")
        if python_row is not None:
            headline.exit_python_loop_over_qemu = quotient(python_row.scan_seconds.median, qemu)
        exit_row, floor = results.row(backend, "exit"), _time(results, backend, "ro-filled")
        if exit_path is not None and exit_row is not None and exit_row.ecam_exits and floor is not None:
            bare_scan = floor + exit_row.ecam_exits * exit_path.bare_seconds_per_exit
            headline.bare_loop_over_qemu = quotient(bare_scan, qemu)
    return headline


def compute_headline(results: BenchResults) -> dict[str, Headline]:
    return {backend: headline_for(results, backend) for backend in results.configs.backends}
