"""Boot a machine, let the scan guest probe its ECAM, and keep what that cost.

One boot gives a `ScanSample`: the scan's time (the guest's own TSC ticks around the scan, from its
done line, so that QEMU rows are timed the same way), the exits by kind, the config reads, and what the
holes cost the host (measured by GuestMemory.stats(): distinct backing pages, memslots, mappings,
and the growth of VmPTE and of the process's mappings since before the machine was built).
`row_from_samples` sums several boots of one machine up into a `ScanRow`: the one row type of the scan
table and of the scaling sweeps (scaling.py pairs each row with the machine shape it measured).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pcihole.bench.configs import Config
from pcihole.bench.errors import BenchError
from pcihole.bench.summary import Summary, ratio
from pcihole.guest.report import ExitLoop, ReportError, ScanStatus, parse_serial, read_scan_tsc
from pcihole.host.tsc import TscClock
from pcihole.machine.builder import MachineBuildError, build_machine
from pcihole.machine.dispatch import StopReason
from pcihole.machine.machinefile import MachineFile
from pcihole.machine.stop_request import StopRelay
from pcihole.memory import DEFAULT_TUNING, HoleTuning
from pcihole.memory.accounting import process_mappings, vm_pte_bytes

#: Quiet (one serial line, not one port exit per character of a device list) and timed.
GUEST_CMDLINE = "pcihole.quiet pcihole.timing"
#: Guest statuses that still mean a complete scan: `truncated` only says the report holds 256
#: devices and the machine has more (the 1024-function scaling point); every function was probed.
ACCEPTED_STATUS_BITS = ScanStatus.TRUNCATED
RUN_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Kernel:
    image: bytes
    name: str


@dataclass
class ScanSample:
    scan_tsc: int
    scan_seconds: float
    #: Machine.run's wall time: the whole guest, ACPI parsing and the done line included
    run_seconds: float
    exits: dict[str, int]
    #: exits in ECAM (reads and writes), present functions' pages included
    ecam_exits: int
    #: exits in hole pages: accesses to absent functions that reached userspace
    absent_exits: int
    config_reads: int
    devices: int
    hole_backing_bytes: int
    memslots: int
    hole_memslots: int
    hole_mappings: int
    vm_pte_growth_bytes: int
    process_mappings_growth: int
    #: host page faults (minor) this process took during the run: on a memslot strategy, mostly
    #: KVM translating the guest's first touch of a hole page whose host page table is not filled yet
    host_faults: int = 0
    #: build_machine's wall time: the memory map, the strategy's backing (and its prefault), ACPI
    build_seconds: float = 0.0
    #: the vCPU loop that ran: "c" or "python" (Machine.run_loop)
    run_loop: str = "python"
    #: the guest's exitloop line, where its command line asked for one (exit_cost.py)
    exit_loop: ExitLoop | None = None


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def boot_and_scan(
    spec: MachineFile,
    config: Config,
    kernel: Kernel,
    clock: TscClock,
    stops: StopRelay | None = None,
    tuning: HoleTuning = DEFAULT_TUNING,
    cmdline: str = GUEST_CMDLINE,
) -> ScanSample:
    """Build `spec` on `config`, run the scan guest once, close the machine; BenchError if it fails.
    `stops` ends the run early (a signal: runner.py). `cmdline` must keep GUEST_CMDLINE's options."""
    pte_before, maps_before = vm_pte_bytes(), process_mappings()
    build_start = time.perf_counter()
    try:
        machine = build_machine(
            spec,
            backend=config.backend,
            strategy=config.strategy,
            kernel=kernel.image,
            kernel_name=kernel.name,
            cmdline=cmdline,
            hole_tuning=tuning,
            run_loop=config.run_loop,
        )
    except MachineBuildError as e:
        raise BenchError(f"{config.label}: cannot build {spec.name or spec.path}: {e}") from e
    build_seconds = time.perf_counter() - build_start
    with machine:
        faults_before = _minor_faults()
        result = machine.run(timeout=RUN_TIMEOUT_SECONDS, stops=stops.for_run() if stops else None)
        host_faults = _minor_faults() - faults_before
        memory_tsc = read_scan_tsc(machine.image, machine.memory.read_guest)
    stop = result.stop
    what = f"{config.label} on {spec.name or spec.path}"
    if stop.reason != StopReason.DEBUG_EXIT or (stop.status or 0) & ~ACCEPTED_STATUS_BITS:
        raise BenchError(f"{what}: the guest did not finish its scan ({stop.reason}, status {stop.status})")
    try:
        serial = parse_serial(result.serial)
    except ReportError as e:
        raise BenchError(f"{what}: {e}") from e
    if serial.scan_tsc is None:
        raise BenchError(
            f"{what}: the guest's done line has no scan_tsc (is scan.elf older than pcihole.timing?)"
        )
    if memory_tsc is not None and memory_tsc != serial.scan_tsc:
        raise BenchError(f"{what}: scan_tsc {serial.scan_tsc} on serial but {memory_tsc} in memory")
    counters = result.memory.exits
    return ScanSample(
        scan_tsc=serial.scan_tsc,
        scan_seconds=clock.seconds(serial.scan_tsc),
        run_seconds=result.seconds,
        exits=result.stats.exits.as_dict(),
        ecam_exits=result.stats.ecam_exits,
        absent_exits=counters.hole_reads + counters.hole_writes_discarded + counters.hole_writes_trapped,
        config_reads=serial.config_reads,
        devices=serial.ndevices,
        hole_backing_bytes=result.memory.hole_backing_bytes,
        memslots=result.memory.memslots,
        hole_memslots=result.memory.hole_memslots,
        hole_mappings=result.memory.hole_mappings,
        vm_pte_growth_bytes=result.memory.vm_pte_bytes - pte_before,
        process_mappings_growth=result.memory.process_mappings - maps_before,
        host_faults=host_faults,
        build_seconds=build_seconds,
        run_loop=machine.run_loop,
        exit_loop=serial.exit_loop,
    )


@dataclass
class ScanRow:
    """One backend x strategy (or the QEMU peer) on one machine, over several boots."""

    backend: str
    strategy: str
    runs: int
    scan_seconds: Summary
    run_seconds: Summary | None
    #: None where the VMM cannot be looked into (QEMU): then see `note`
    exits: dict[str, int] | None
    ecam_exits: int | None
    absent_exits: int | None
    config_reads: int
    devices: int
    hole_backing_bytes: int | None
    memslots: int | None
    hole_mappings: int | None
    vm_pte_growth_bytes: int | None
    process_mappings_growth: int | None
    #: figure -> value / the best (smallest) value of that figure on the same KVM
    ratios: dict[str, float | None] = field(default_factory=dict)
    note: str = ""
    #: host page faults during the run (the last boot's; see ScanSample), None where not measured
    host_faults: int | None = None
    build_seconds: Summary | None = None
    #: the run loop asked for ("auto" or "python": Config.run_loop) and the one that ran ("c",
    #: "python"; "" for QEMU)
    run_loop_asked: str = "auto"
    run_loop: str = ""

    @property
    def label(self) -> str:
        return f"{self.backend} / {self.short_label}"

    @property
    def short_label(self) -> str:
        """The label within one backend's plot."""
        return self.strategy + (" (Python loop)" if self.run_loop_asked == "python" else "")

    @property
    def kvm_group(self) -> str:
        """Rows compared with each other: those on the same (real or model) KVM. QEMU runs on /dev/kvm."""
        return "kvm" if self.backend in ("kvm", "qemu") else self.backend

    def as_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["scan_seconds"] = self.scan_seconds.as_dict()
        d["run_seconds"] = self.run_seconds.as_dict() if self.run_seconds else None
        d["build_seconds"] = self.build_seconds.as_dict() if self.build_seconds else None
        return d


def row_from_samples(config: Config, samples: list[ScanSample]) -> ScanRow:
    # Counts are the same every boot (the guest is deterministic); the first boot's are kept, and the
    # memory figures of the last (after the allocator and page tables have settled).
    first, last = samples[0], samples[-1]
    return ScanRow(
        backend=config.backend,
        strategy=config.strategy,
        runs=len(samples),
        scan_seconds=Summary.of([s.scan_seconds for s in samples]),
        run_seconds=Summary.of([s.run_seconds for s in samples]),
        exits=first.exits,
        ecam_exits=first.ecam_exits,
        absent_exits=first.absent_exits,
        config_reads=first.config_reads,
        devices=first.devices,
        hole_backing_bytes=last.hole_backing_bytes,
        memslots=last.memslots,
        hole_mappings=last.hole_mappings,
        vm_pte_growth_bytes=last.vm_pte_growth_bytes,
        process_mappings_growth=last.process_mappings_growth,
        host_faults=last.host_faults,
        build_seconds=Summary.of([s.build_seconds for s in samples]),
        run_loop_asked=config.run_loop,
        run_loop=first.run_loop,
    )


def scan_default_machine(
    spec: MachineFile,
    config: Config,
    runs: int,
    kernel: Kernel,
    clock: TscClock,
    on_run: Callable[[], None] = lambda: None,
    stops: StopRelay | None = None,
    tuning: HoleTuning = DEFAULT_TUNING,
) -> ScanRow:
    samples = []
    for _ in range(runs):
        samples.append(boot_and_scan(spec, config, kernel, clock, stops, tuning))
        on_run()
    return row_from_samples(config, samples)


#: The figures compared across rows, and how to read each from a row.
RATIO_FIGURES: dict[str, Callable[[ScanRow], float | None]] = {
    "scan_seconds": lambda r: r.scan_seconds.median,
    "exits_total": lambda r: r.exits["total"] if r.exits else None,
    "ecam_exits": lambda r: r.ecam_exits,
    "absent_exits": lambda r: r.absent_exits,
    "hole_backing_bytes": lambda r: r.hole_backing_bytes,
    "memslots": lambda r: r.memslots,
}


def add_ratios(rows: list[ScanRow]) -> None:
    """Each figure's ratio to the best row of the same KVM (1.0 = best; 3.0 = three times the best)."""
    for group in {r.kvm_group for r in rows}:
        members = [r for r in rows if r.kvm_group == group]
        for name, value_of in RATIO_FIGURES.items():
            values = [v for v in (value_of(r) for r in members) if v is not None]
            best = min(values) if values else None
            for r in members:
                r.ratios[name] = ratio(value_of(r), best)
