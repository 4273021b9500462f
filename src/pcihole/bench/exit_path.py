"""What one exit through pcihole costs, against the least any Python VMM can do per exit.

The floor is a bare loop: a tiny guest reads a 4-byte MMIO address with no memslot N times, and the
host only re-enters KVM_RUN, completing each read with a constant (no bus, no memory map, no stats).
Its VM has what every machine's has on kvm, the in-kernel irqchip and PIT (they make KVM_RUN itself
dearer), so that the difference is pcihole's own.
The guest times itself with the TSC, and runs the same loop over RAM as a baseline, so

    bare ticks per exit = (ticks of N MMIO reads - ticks of N RAM reads) / N.

pcihole's cost per dispatched exit comes from the scan table, the same way: the `exit` strategy's scan
against the same scan with every hole backed by memory (`ro-filled`, no exit for absent functions),
divided by the extra ECAM exits. Their ratio is what pcihole's dispatch in Python adds to each exit.

Where that goes (`measure_breakdown`): the same loop guest, its reads now going through pcihole's own
path (the run loop's steps, machine/run_loop.py: KVM_RUN and decode, drain the coalesced ring, the
exit handler and MMIO bus, the ECAM window and the memory map's view, completing the read), each
step timed with the host clock in one process, beside the bare loop run the same way (so their
ratio holds on a loaded host). The decode is timed apart by decoding the same kvm_run again. The
step timers cost time of their own (six clock reads per exit), so the same reads are also run through
the real run loop (`run_until_stop`) untimed inside: its seconds per exit against the bare loop's is
the ratio to quote.

On kvm the same reads also go through the C run loop (hv/kvm/run_loop.c), which answers them
without returning to Python: bare (its table over the target and nothing else: the least a C loop
does per exit), and through the machine's run loop with the machine's table and counting
(machine/ecam_window.py's FillPagesWiring). All four loops alternate in one process.
"""

from __future__ import annotations

import statistics
import struct
import time
from dataclasses import asdict, dataclass, field

from pcihole.bench.errors import BenchError
from pcihole.bench.scan import ScanRow
from pcihole.bench.summary import quotient
from pcihole.host.mman import HostMapping
from pcihole.host.tsc import TscClock
from pcihole.hv import open_backend
from pcihole.hv.exits import IoOut, MmioRead
from pcihole.hv.kvm.c_run_loop import CRunLoop, CRunLoopUnavailable, FillPages, LoggedReads
from pcihole.hv.kvm.c_run_loop import load as load_c_run_loop
from pcihole.hv.uapi import KvmCap
from pcihole.hv.x86_cpu_state import enter_protected_mode_flat
from pcihole.machine.bus import Bus, BusDevice
from pcihole.machine.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from pcihole.machine.dispatch import ExitHandler, StopReason
from pcihole.machine.ecam_window import EcamWindow, FillPagesWiring, HotplugWiring
from pcihole.machine.run_loop import run_until_stop
from pcihole.machine.stats import RunStats
from pcihole.memory import GuestMemory, GuestRange, Hole, MemoryMap
from pcihole.memory.region import Ram
from pcihole.pci.host_bridge import HostBridge
from pcihole.pci.topology import Segment, Topology

RAM_SIZE = 0x10000
CODE_GPA = 0x1000
RESULT_GPA = 0x2000  # u64: TSC ticks the loop took
RAM_TARGET_GPA = 0x3000
#: No memslot here: every read exits (the default machine's ECAM base, for familiarity).
MMIO_TARGET_GPA = 0xE0000000
#: What the loops through pcihole read: function 00:01.0 of the ECAM window at MMIO_TARGET_GPA, which
#: is absent (the window's host bridge is 00:00.0), as the `exit` scan's reads are by the thousand.
ABSENT_TARGET_GPA = MMIO_TARGET_GPA + (1 << 15)
DONE_PORT = DEBUG_EXIT_PORT  # the loop guest ends with `out 0xf4`, as the scan guest does
FILL = b"\xff" * 8

# 32-bit flat protected mode; ECX = reads, ESI = the address read. Assembled by hand (as small as it
# is, listed here so it can be checked against `as --32`):
LOOP_GUEST = bytes.fromhex(
    "0f31"          # rdtsc                 ; edx:eax = start
    "89c7"          # mov   edi, eax
    "89d5"          # mov   ebp, edx
    "8b06"          # 1: mov eax, [esi]     ; the read being measured
    "49"            # dec   ecx
    "75fb"          # jnz   1b
    "0f31"          # rdtsc
    "29f8"          # sub   eax, edi
    "19ea"          # sbb   edx, ebp        ; edx:eax = ticks
    "a300200000"    # mov   [0x2000], eax
    "891504200000"  # mov   [0x2004], edx
    "e6f4"          # out   0xf4, al        ; done
    "f4"            # hlt
)  # fmt: skip


@dataclass
class ExitPathResult:
    backend: str
    reads: int
    runs: int
    bare_seconds_per_exit: float
    #: None where the scan table lacks the exit or ro-filled row of this backend
    pcihole_seconds_per_exit: float | None
    #: pcihole / bare: 1.0 would mean pcihole adds nothing to an exit
    ratio: float | None
    #: where one exit through pcihole's path goes, measured in one process (see ExitBreakdown)
    breakdown: ExitBreakdown | None = None

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["breakdown"] = self.breakdown.as_dict() if self.breakdown else None
        return d


#: The steps of one exit, in the order the run loop takes them.
STEPS = ("ioctl", "decode", "drain", "dispatch", "device", "completion")


@dataclass
class ExitBreakdown:
    """Seconds per exit, by step, through pcihole's path, and the bare loop's per exit (host clock,
    the same process, runs alternated)."""

    backend: str
    reads: int
    #: step -> seconds per exit (median over the runs): ioctl = KVM_RUN itself (guest and kernel
    #: included), decode = kvm_run -> exit dataclass, drain = the coalesced ring, dispatch = the exit
    #: handler and bus lookup, device = the ECAM window and the memory map's view, completion =
    #: the read's bytes into kvm_run
    steps: dict[str, float] = field(default_factory=dict)
    #: the bare loop's whole exit (KVM_RUN, decode, a constant completion), per exit
    bare_seconds_per_exit: float = 0.0
    #: exits that went through pcihole's path in the last run (one per read of the loop guest)
    exits: int = 0
    #: the same reads through the machine's run loop (run_until_stop), no step timers, per exit
    run_loop_seconds_per_exit: float = 0.0
    #: kvm, where the C loop builds: the reads answered by the bare C loop (its table, nothing
    #: else), and through the machine's run loop with the C loop (its counting included), per exit
    c_bare_seconds_per_exit: float | None = None
    c_run_loop_seconds_per_exit: float | None = None
    #: why there are no C figures (the model backend, or the C loop cannot be built here)
    c_skipped: str = ""

    @property
    def total(self) -> float:
        return sum(self.steps.values())

    @property
    def ratio(self) -> float | None:
        """The timed steps' sum against the bare loop (the timers' own cost included)."""
        return self.total / self.bare_seconds_per_exit if self.bare_seconds_per_exit > 0 else None

    @property
    def run_loop_ratio(self) -> float | None:
        """The untimed run loop against the bare loop: what pcihole adds to an exit."""
        if self.bare_seconds_per_exit <= 0 or self.run_loop_seconds_per_exit <= 0:
            return None
        return self.run_loop_seconds_per_exit / self.bare_seconds_per_exit

    @property
    def c_run_loop_ratio(self) -> float | None:
        """The run loop with the C loop against the bare C loop: what pcihole adds to a C exit."""
        return quotient(self.c_run_loop_seconds_per_exit, self.c_bare_seconds_per_exit)

    @property
    def c_run_loop_over_python_bare(self) -> float | None:
        """The run loop with the C loop against the bare Python loop (the floor of a Python VMM)."""
        return quotient(self.c_run_loop_seconds_per_exit, self.bare_seconds_per_exit)

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["total"] = self.total
        d["ratio"] = self.ratio
        d["run_loop_ratio"] = self.run_loop_ratio
        d["c_run_loop_ratio"] = self.c_run_loop_ratio
        d["c_run_loop_over_python_bare"] = self.c_run_loop_over_python_bare
        return d


class _TimedDevice:
    """A bus device that adds the time spent in the device it wraps to `seconds`."""

    def __init__(self, device: BusDevice) -> None:
        self.device = device
        self.seconds = 0.0

    def read(self, addr: int, size: int) -> bytes:
        start = time.perf_counter()
        data = self.device.read(addr, size)
        self.seconds += time.perf_counter() - start
        return data

    def write(self, addr: int, data: bytes) -> None:
        start = time.perf_counter()
        self.device.write(addr, data)
        self.seconds += time.perf_counter() - start


def _with_machine_platform(hv, vm) -> None:  # type: ignore[no-untyped-def]
    """On kvm, the in-kernel irqchip and PIT that every machine has (builder.py), so that the bare
    loop's KVM_RUN does what the machine's does: measured here, they add about a tenth to each
    round trip, a kernel cost that pcihole's dispatch must not be charged with."""
    if hv.name == "kvm":
        vm.set_identity_map_addr()
        vm.create_irqchip()
        vm.create_pit2()


def _loop_vm(backend: str, reads: int, target_gpa: int, memory_strategy: str | None):  # type: ignore[no-untyped-def]
    """The loop guest's VM: bare RAM (memory_strategy None) or a GuestMemory with RAM and an ECAM
    hole over the ECAM window at MMIO_TARGET_GPA (as the machine builds it). Returns (hv, vm, vcpu, memory, ram)."""
    hv = open_backend(backend)
    vm = hv.create_vm()
    _with_machine_platform(hv, vm)
    memory = ram = None
    if memory_strategy is None:
        ram = HostMapping.anonymous(RAM_SIZE, name="exit-path guest RAM")
        vm.set_user_memory_region(0, 0, 0, RAM_SIZE, ram.addr)
        ram.write(CODE_GPA, LOOP_GUEST)
    else:
        memory = GuestMemory(hv, vm, memory_strategy)
        hole = Hole(GuestRange.from_size(MMIO_TARGET_GPA, 1 << 20), "ecam")
        memory.update(MemoryMap([Ram(GuestRange.from_size(0, RAM_SIZE), "ram"), hole]))
        memory.write_guest(CODE_GPA, LOOP_GUEST)
    vcpu = _loop_vcpu(hv, vm, reads, target_gpa)
    return hv, vm, vcpu, memory, ram


def _loop_vcpu(hv, vm, reads: int, target_gpa: int):  # type: ignore[no-untyped-def]
    """vCPU 0 with the backend's CPUID, in flat protected mode at LOOP_GUEST, set to make `reads`
    4-byte reads of `target_gpa` (ECX, ESI)."""
    vcpu = vm.create_vcpu(0)
    if hv.check_extension(KvmCap.KVM_CAP_EXT_CPUID):
        vcpu.set_cpuid2(hv.get_supported_cpuid())
    enter_protected_mode_flat(vcpu, CODE_GPA)
    regs = vcpu.get_regs()
    regs.rcx, regs.rsi = reads, target_gpa
    vcpu.set_regs(regs)
    return vcpu


def _close(hv, vm, vcpu, memory, ram) -> None:  # type: ignore[no-untyped-def]
    # The vCPU and the VM before the memory they map (Machine.close says why).
    vcpu.close()
    vm.close()
    if memory is not None:
        memory.close()
    if ram is not None:
        ram.close()
    hv.close()


def _bare_seconds(backend: str, reads: int) -> float:
    """The bare loop, timed by the host clock: seconds per exit."""
    hv, vm, vcpu, memory, ram = _loop_vm(backend, reads, ABSENT_TARGET_GPA, None)
    try:
        exits = 0
        start = time.perf_counter()
        while True:
            exit_ = vcpu.run()
            if type(exit_) is MmioRead:
                vcpu.complete_read(FILL[: exit_.size])
                exits += 1
                continue
            if type(exit_) is IoOut and exit_.port == DONE_PORT:
                break
            raise BenchError(f"exit-path guest on {backend}: unexpected exit {exit_}")
        return (time.perf_counter() - start) / max(exits, 1)
    finally:
        _close(hv, vm, vcpu, memory, ram)


def _bare_c_seconds(backend: str, reads: int, loop: CRunLoop) -> float:
    """The bare C loop: the same reads answered by the C loop from a table over the target (no
    present page, a sink that keeps nothing), timed by the host clock: seconds per exit."""
    hv, vm, vcpu, memory, ram = _loop_vm(backend, reads, ABSENT_TARGET_GPA, None)
    try:
        answered = [0]

        def sink(reads: LoggedReads) -> None:
            answered[0] += len(reads)

        fill_pages = FillPages(loop, [(MMIO_TARGET_GPA, 1 << 20, 0xFF)], sink)
        start = time.perf_counter()
        while True:
            exit_ = vcpu.run_answering(fill_pages)
            if type(exit_) is IoOut and exit_.port == DONE_PORT:
                break
            raise BenchError(f"exit-path guest on {backend}: unexpected exit {exit_} from the C loop")
        seconds = time.perf_counter() - start
        if answered[0] != reads:
            raise BenchError(
                f"exit-path guest on {backend}: the C loop answered {answered[0]} of {reads} reads"
            )
        return seconds / reads
    finally:
        _close(hv, vm, vcpu, memory, ram)


def _ecam_handler(
    memory: GuestMemory, timed: bool
) -> tuple[ExitHandler, RunStats, _TimedDevice | None, HostBridge]:
    """The machine's exit handler over one ECAM window on an `exit` hole (builder.py wires the same)."""
    segment = Segment(0, MMIO_TARGET_GPA, 0, 0)
    stats = RunStats()
    host_bridge = HostBridge(Topology((segment,)))
    window: BusDevice = EcamWindow(memory.view, host_bridge, stats)
    timed_window = _TimedDevice(window) if timed else None
    mmio = Bus("mmio")
    mmio.insert(timed_window or window, segment.window_base, segment.window_size, "ECAM")
    return ExitHandler(mmio, Bus("port"), stats), stats, timed_window, host_bridge


def _run_loop_seconds(backend: str, reads: int, c_loop: CRunLoop | None = None) -> float:
    """The loop guest's reads through the machine's run loop, untimed inside: seconds per exit. The
    guest's done `out` goes to the machine's debug-exit device, which ends the run. With `c_loop`,
    the C loop answers the reads, through the machine's table and counting (builder.py)."""
    hv, vm, vcpu, memory, ram = _loop_vm(backend, reads, ABSENT_TARGET_GPA, "exit")
    try:
        assert memory is not None
        handler, stats, _, host_bridge = _ecam_handler(memory, timed=False)
        handler.pio.insert(DebugExit(), DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, "debug-exit")
        fill_pages = None
        if c_loop is not None:
            hotplug = HotplugWiring(host_bridge, memory)
            fill_pages = FillPagesWiring(c_loop, host_bridge, hotplug, stats).fill_pages
        start = time.perf_counter()
        stop = run_until_stop(vcpu, handler, on_coalesced=memory.view.coalesced, fill_pages=fill_pages)
        seconds = time.perf_counter() - start
        if (
            stop.reason != StopReason.DEBUG_EXIT
            or not stats.exits.mmio_read == stats.ecam_absent_exits == reads
        ):
            raise BenchError(
                f"exit-path guest on {backend}: {stats.exits.mmio_read} of {reads} reads "
                f"({stats.ecam_absent_exits} at an absent function), ended by {stop}"
            )
        return seconds / stats.exits.total
    finally:
        _close(hv, vm, vcpu, memory, ram)


def _pcihole_steps(backend: str, reads: int) -> tuple[dict[str, float], int]:
    """The loop guest's reads through pcihole's path (an ECAM window over an `exit` hole), each step
    timed: seconds per exit by step, and the exits."""
    hv, vm, vcpu, memory, ram = _loop_vm(backend, reads, ABSENT_TARGET_GPA, "exit")
    try:
        assert memory is not None
        handler, _, window, _ = _ecam_handler(memory, timed=True)
        assert window is not None
        decode = getattr(vcpu, "_decode", None)  # the kvm Vcpu's; the model decodes inside run()
        clock = time.perf_counter
        sums = dict.fromkeys(STEPS, 0.0)
        exits = 0
        while True:
            t0 = clock()
            exit_ = vcpu.run()
            t1 = clock()
            if decode is not None:
                decode()
            t2 = clock()
            writes = vcpu.drain_coalesced_mmio()
            if writes:
                memory.view.coalesced(writes)
            t3 = clock()
            if type(exit_) is IoOut and exit_.port == DONE_PORT:
                break
            device_before = window.seconds
            result = handler.handle(exit_)
            t4 = clock()
            if not isinstance(result, bytes):
                raise BenchError(f"exit-path guest on {backend}: unexpected exit {exit_}")
            vcpu.complete_read(result)
            t5 = clock()
            decode_s = t2 - t1
            device_s = window.seconds - device_before
            sums["ioctl"] += t1 - t0 - (decode_s if decode is not None else 0.0)
            sums["decode"] += decode_s
            sums["drain"] += t3 - t2
            sums["dispatch"] += t4 - t3 - device_s
            sums["device"] += device_s
            sums["completion"] += t5 - t4
            exits += 1
        return {k: v / max(exits, 1) for k, v in sums.items()}, exits
    finally:
        _close(hv, vm, vcpu, memory, ram)


def measure_breakdown(backend: str, reads: int, runs: int) -> ExitBreakdown:
    """Per-step cost of an exit through pcihole, and the bare loop's, alternated `runs` times; on
    kvm, the bare C loop and the run loop with the C loop too."""
    c_loop, c_skipped = None, ""
    if backend != "kvm":
        c_skipped = f"the C run loop loops on KVM_RUN: the {backend} backend has none"
    else:
        try:
            c_loop = load_c_run_loop()
        except CRunLoopUnavailable as e:
            c_skipped = str(e)
    bare, steps, loop, c_bare, c_run = [], [], [], [], []
    exits = 0
    for _ in range(max(runs, 1)):
        bare.append(_bare_seconds(backend, reads))
        run_steps, exits = _pcihole_steps(backend, reads)
        steps.append(run_steps)
        loop.append(_run_loop_seconds(backend, reads))
        if c_loop is not None:
            c_bare.append(_bare_c_seconds(backend, reads, c_loop))
            c_run.append(_run_loop_seconds(backend, reads, c_loop))
    return ExitBreakdown(
        backend=backend,
        reads=reads,
        steps={k: statistics.median(s[k] for s in steps) for k in STEPS},
        bare_seconds_per_exit=statistics.median(bare),
        exits=exits,
        run_loop_seconds_per_exit=statistics.median(loop),
        c_bare_seconds_per_exit=statistics.median(c_bare) if c_bare else None,
        c_run_loop_seconds_per_exit=statistics.median(c_run) if c_run else None,
        c_skipped=c_skipped,
    )


def loop_ticks(backend: str, reads: int, target_gpa: int) -> int:
    """Run the loop guest once on a fresh VM; the TSC ticks of its `reads` reads of `target_gpa`."""
    hv = open_backend(backend)
    vm = vcpu = ram = None
    try:
        vm = hv.create_vm()
        _with_machine_platform(hv, vm)
        ram = HostMapping.anonymous(RAM_SIZE, name="exit-path guest RAM")
        ram.write(CODE_GPA, LOOP_GUEST)
        vm.set_user_memory_region(0, 0, 0, RAM_SIZE, ram.addr)
        vcpu = _loop_vcpu(hv, vm, reads, target_gpa)
        while True:  # the bare loop: nothing between two KVM_RUNs but completing the read
            exit_ = vcpu.run()
            if type(exit_) is MmioRead:
                vcpu.complete_read(FILL[: exit_.size])
                continue
            if type(exit_) is IoOut and exit_.port == DONE_PORT:
                break
            raise BenchError(f"exit-path guest on {backend}: unexpected exit {exit_}")
        return struct.unpack("<Q", ram.read(RESULT_GPA, 8))[0]
    finally:
        if vcpu is not None:
            vcpu.close()
        if vm is not None:
            vm.close()
        if ram is not None:
            ram.close()
        hv.close()


def dispatched_seconds_per_exit(rows: list[ScanRow], backend: str) -> float | None:
    by_strategy = {r.strategy: r for r in rows if r.backend == backend and r.run_loop_asked == "auto"}
    exit_row, floor_row = by_strategy.get("exit"), by_strategy.get("ro-filled")
    if exit_row is None or floor_row is None or exit_row.ecam_exits is None or floor_row.ecam_exits is None:
        return None
    extra_exits = exit_row.ecam_exits - floor_row.ecam_exits
    if extra_exits <= 0:
        return None
    return (exit_row.scan_seconds.median - floor_row.scan_seconds.median) / extra_exits


def measure_exit_path(
    backend: str, reads: int, runs: int, rows: list[ScanRow], clock: TscClock
) -> ExitPathResult:
    # Medians over several VMs, as the scan rows it is compared with are medians over several boots.
    mmio = statistics.median(loop_ticks(backend, reads, MMIO_TARGET_GPA) for _ in range(runs))
    ram = statistics.median(loop_ticks(backend, reads, RAM_TARGET_GPA) for _ in range(runs))
    bare = clock.seconds(round(max(mmio - ram, 0))) / reads
    pcihole = dispatched_seconds_per_exit(rows, backend)
    return ExitPathResult(
        backend=backend,
        reads=reads,
        runs=runs,
        bare_seconds_per_exit=bare,
        pcihole_seconds_per_exit=pcihole,
        ratio=pcihole / bare if pcihole is not None and bare > 0 else None,
        breakdown=measure_breakdown(backend, reads, runs),
    )
