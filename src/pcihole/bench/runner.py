"""`pcihole bench`: measure every backend x strategy this machine has, in one run, and write
bench.json, bench.md and PNG plots into the output directory.

Order: the default machine's scan per backend x strategy, QEMU as a peer, the exit path, hot-plug,
ro-alias's granule and prefault sweep, then the scaling sweeps (the longest part), then with --linux the Linux boots (linux_boot.py). A progress bar runs on stderr; a short summary and the
paths go to stdout. Returns the process exit status: 0, or 1 when a measurement failed (one line on
stderr saying which), 2 when nothing can be measured.

A stop asked through `stops` (SIGINT / SIGTERM: cli.py hands them to a thread that calls
StopRelay.request) kicks the guest run in progress, which returns at its next exit, or terminates
the QEMU peer in progress (child_process.py); every later run returns at once, and the next
progress step raises BenchStopped, so nothing more is measured.
The results are written into a temporary directory inside the output directory and moved into
place only when all of them are complete, so a stopped bench leaves no partial bench.json, bench.md
or plot behind (an earlier run's complete files stay as they were).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from pcihole.bench import alias_sweep, linux_boot, qemu_peer
from pcihole.bench.configs import discover
from pcihole.bench.errors import BenchError
from pcihole.bench.exit_path import measure_exit_path
from pcihole.bench.exit_vs_qemu import measure_exit_vs_qemu
from pcihole.bench.headline import compute_headline
from pcihole.bench.host import hardware_kvm, host_info, load_average
from pcihole.bench.hotplug import WRITE_POLICIES, measure_hotplug
from pcihole.bench.plan import BenchPlan, plan_for
from pcihole.bench.progress import Progress
from pcihole.bench.report import headline_lines, markdown
from pcihole.bench.results import BenchResults
from pcihole.bench.scaling import measure_scaling, point_count, shapes
from pcihole.bench.scan import Kernel, add_ratios, scan_default_machine
from pcihole.host.exit_status import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from pcihole.host.tsc import TscUnknown, tsc_clock
from pcihole.machine.builder import HostUnavailable, MachineBuildError, check_machine, default_kernel
from pcihole.machine.machinefile import load_default
from pcihole.machine.stop_request import StopRelay

JSON_NAME = "bench.json"
MARKDOWN_NAME = "bench.md"


class BenchStopped(Exception):
    """A stop was asked (a signal): the bench ends without results; the caller says why."""


class _StoppableProgress(Progress):
    """Progress that ends the bench at its next step once a stop was asked. Steps come between guest
    runs, and some measurements (the exit path) run a vCPU without a StopRequest: they end at their
    next step instead, which is at most one run later."""

    def __init__(self, total: int, stops: StopRelay) -> None:
        super().__init__(total)
        self._stops = stops

    def step(self, what: str, n: int = 1) -> None:
        self._check()
        super().step(what, n)

    def note(self, what: str) -> None:
        self._check()
        super().note(what)

    def _check(self) -> None:
        if self._stops.stop is not None:
            raise BenchStopped


def _work_units(
    plan: BenchPlan,
    configs: int,
    backends: int,
    with_qemu: bool,
    linux_boots: int = 0,
    alias_backends: int = 0,
    extra_scan_rows: int = 0,
) -> int:
    return (
        linux_boots
        + (configs + extra_scan_rows) * plan.scan_runs
        + (plan.qemu_runs + plan.alternated_rounds if with_qemu else 0)  # the QEMU row, the alternated rounds
        + backends
        + configs
        + alias_backends * alias_sweep.point_count(plan)
        + configs * point_count(plan)
    )


def _alias_backends(results: BenchResults) -> list[str]:
    return [
        b for b in results.configs.backends if any(c.strategy == "ro-alias" for c in results.configs.of(b))
    ]


def measure(results: BenchResults, progress: Progress, stops: StopRelay | None = None) -> None:
    plan, configs, clock = results.plan, results.configs, results.clock
    kernel = Kernel(*default_kernel())
    default_machine = load_default()

    for config in configs.scan_configs:
        label = f"scan: {config.label}"
        progress.note(label)
        row = scan_default_machine(
            default_machine,
            config,
            plan.scan_runs,
            kernel,
            clock,
            on_run=partial(progress.step, label),
            stops=stops,
        )
        results.scan.append(row)
    if results.qemu_skipped is None:
        progress.note("scan: QEMU q35 (its firmware takes a few seconds per boot)")
        try:
            results.scan.append(
                qemu_peer.scan_on_qemu(
                    default_machine,
                    plan.qemu_runs,
                    clock,
                    on_run=lambda: progress.step("scan: QEMU"),
                    stops=stops,
                )
            )
        except BenchError as e:
            results.qemu_skipped = f"QEMU failed: {e}"
    if results.qemu_skipped is None:
        progress.note("exit vs QEMU: a boot of each in turn, timing the scan and one config read")
        try:
            results.exit_vs_qemu, results.exit_cost = measure_exit_vs_qemu(
                default_machine,
                plan.alternated_rounds,
                plan.exit_loop_reads,
                kernel,
                clock,
                stops,
                on_round=lambda: progress.step("exit vs QEMU"),
            )
        except BenchError as e:
            # Not qemu_skipped: the QEMU row is there, and the boot that failed may be pcihole's.
            results.alternated_skipped = f"a boot of the rounds failed: {e}"
    add_ratios(results.scan)

    for backend in configs.backends:
        progress.note(f"exit path: {backend}")
        results.exit_path.append(
            measure_exit_path(backend, plan.exit_path_reads, plan.exit_path_runs, results.scan, clock)
        )
        progress.step(f"exit path: {backend}")

    for config in configs.configs:
        progress.note(f"hot-plug: {config.label}")
        for writes in WRITE_POLICIES:
            results.hotplug.append(
                measure_hotplug(default_machine, config, plan.hotplug_changes, kernel, writes=writes)
            )
        progress.step(f"hot-plug: {config.label}")

    for backend in _alias_backends(results):
        progress.note(f"ro-alias granule and prefault: {backend}")
        results.alias_sweep[backend] = alias_sweep.measure_alias_sweep(
            default_machine,
            backend,
            plan,
            kernel,
            clock,
            on_point=lambda what: progress.step(f"sweep: {what}"),
            stops=stops,
        )

    for config in configs.configs:
        results.scaling += measure_scaling(
            config,
            plan,
            kernel,
            clock,
            on_point=lambda what: progress.step(f"scaling: {what}"),
            stops=stops,
        )

    if results.linux_measured:
        progress.note("Linux boot: the Debian kernel (minutes per boot on a software KVM)")
        results.linux, results.linux_skipped = linux_boot.measure_linux(
            default_machine,
            configs.configs,
            hardware_kvm(),
            on_row=lambda what: progress.step(f"Linux boot: {what}"),
            stops=stops,
        )


def run_bench(
    out_dir: str | Path,
    quick: bool = False,
    backends: Sequence[str] | None = None,
    linux: bool = False,
    stops: StopRelay | None = None,
) -> int:
    """Measure and write the results; the exit status. Raises BenchStopped (or the error the kicked
    run ended with) once `stops` was asked, having written nothing."""
    start = time.monotonic()
    stops = stops if stops is not None else StopRelay()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"pcihole: error: {out}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    configs = discover(backends)
    if not configs.configs:
        reasons = "; ".join(configs.skipped.values()) or "no backend asked for"
        print(f"pcihole: error: nothing to measure: {reasons}", file=sys.stderr)
        return EXIT_USAGE
    plan = plan_for(quick)
    try:
        refused = _refused_machine(configs.backends, plan, linux)
    except HostUnavailable as e:
        print(f"pcihole: error: bench: {e}", file=sys.stderr)
        return EXIT_FAILED
    if refused is not None:
        print(f"pcihole: error: {refused}", file=sys.stderr)
        return EXIT_USAGE
    try:
        clock = tsc_clock()
    except TscUnknown as e:
        print(f"pcihole: error: bench: {e}", file=sys.stderr)
        return EXIT_FAILED
    results = BenchResults(
        plan=plan,
        host=host_info(),
        clock=clock,
        configs=configs,
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        linux_measured=linux,
    )
    if "kvm" not in configs.backends:
        results.qemu_skipped = "the kvm backend is not measured, and QEMU is its peer"
    else:
        results.qemu_skipped = qemu_peer.unavailable_reason()
    linux_boots = 0
    if linux:
        linux_boots = (
            sum(c.backend in linux_boot.LINUX_BACKENDS for c in configs.configs) + 1 + hardware_kvm()
        )
    progress = _StoppableProgress(
        _work_units(
            plan,
            len(configs.configs),
            len(configs.backends),
            results.qemu_skipped is None,
            linux_boots,
            len(_alias_backends(results)),
            len(configs.scan_configs) - len(configs.configs),
        ),
        stops,
    )
    try:
        measure(results, progress, stops)
    except BaseException as e:
        if stops.stop is not None:
            progress.abandon()  # the stop, not what it made fail, is the outcome: the caller says it
            raise
        if not isinstance(e, BenchError):
            raise
        progress.finish("failed")
        print(f"pcihole: error: bench: {e}", file=sys.stderr)
        return EXIT_FAILED
    progress.finish("writing results")
    results.host = replace(results.host, load_at_end=load_average())
    results.headline = compute_headline(results)
    results.seconds = time.monotonic() - start
    plot_names = _write_results(results, out, stops)

    print("\n".join(headline_lines(results)))
    written = [JSON_NAME, MARKDOWN_NAME, *plot_names]
    print(f"\nwrote {', '.join(str(out / n) for n in written)} in {results.seconds:.1f} s")
    return EXIT_OK


def _refused_machine(backends: Sequence[str], plan: BenchPlan, linux: bool) -> str | None:
    """Why a machine the bench would build is refused on a backend it measures (the default
    machine, with Linux's RAM too for --linux, and every scaling machine: builder.check_machine),
    or None; checked before any guest runs, so a bench never stops halfway over a machine."""
    default = load_default()
    machines = [default, *(shape.machine() for _, shape in shapes(plan))]
    if linux:
        machines.append(linux_boot.with_linux_ram(default))
    for backend in backends:
        for spec in machines:
            try:
                check_machine(spec, backend)
            except HostUnavailable:
                raise
            except MachineBuildError as e:
                return str(e)
    return None


def _write_results(results: BenchResults, out: Path, stops: StopRelay) -> list[str]:
    """Write bench.json, bench.md and the plots into a temporary directory in `out`, then move each
    into `out` (rename(2): atomic) once all are complete and no stop was asked; the plots' names."""
    staging = Path(tempfile.mkdtemp(prefix=".bench-", dir=out))
    try:
        from pcihole.bench.plots import write_plots  # matplotlib is imported only now: slow to load

        try:
            plot_names = write_plots(results, staging)
        except ImportError as e:
            print(
                f"pcihole: warning: no plots ({e}; install the 'bench' extra: pip install 'pcihole[bench]')",
                file=sys.stderr,
            )
            plot_names = []
        results.write_json(staging / JSON_NAME)
        (staging / MARKDOWN_NAME).write_text(markdown(results, plot_names))
        if stops.stop is not None:
            raise BenchStopped
        for name in (*plot_names, MARKDOWN_NAME, JSON_NAME):  # bench.json last: it says "complete"
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return plot_names
