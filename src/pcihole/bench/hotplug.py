"""What a hot-plug change costs each strategy: punching one function's ECAM page out of its hole (the
function appears) and filling it back (it leaves), through the host bridge and the machine's
HotplugWiring, as a running VMM would do it.

Counted by the machine's `Vm` observer (hv/interface.py IoctlObserver: every ioctl of the VM tells
it): KVM_SET_USER_MEMORY_REGION creates (size > 0) and deletes (size 0), coalesced-MMIO zones and
MMIO fill devices (un)registered. Timed with the host clock around add_function /
remove_function (no guest runs: the change itself is measured, not what the guest sees next).

Each strategy is measured under each write policy for absent functions (the machine file's
`writes`), because the policy decides whether coalesced zones surround the function's page: with
"discard" a change re-registers them (KVM_UNREGISTER_COALESCED_MMIO waits for an SRCU grace
period), with "trap" and "exit" there are none. What the policy costs a guest that writes to absent
functions is given beside it: the exits per such write, read off the zones in force (a write inside
a zone is coalesced into the ring and costs no exit while the ring has room; any other exits).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from pcihole.bench.configs import Config
from pcihole.bench.errors import BenchError
from pcihole.bench.scan import GUEST_CMDLINE, Kernel
from pcihole.bench.summary import Summary
from pcihole.hv.interface import Vm
from pcihole.hv.uapi import kvm_userspace_memory_region
from pcihole.machine.builder import MachineBuildError, build_machine
from pcihole.machine.machinefile import MachineFile
from pcihole.pci.bdf import Bdf
from pcihole.pci.topology import WRITE_POLICIES, WRITES_DISCARD, EndpointSpec

#: The zone and fill-device ioctls counted, under the names the results use (the Vm methods').
OTHER_OPS = {
    "KVM_REGISTER_COALESCED_MMIO": "register_coalesced_mmio",
    "KVM_UNREGISTER_COALESCED_MMIO": "unregister_coalesced_mmio",
    "KVM_REGISTER_MMIO_FILL": "register_mmio_fill",
    "KVM_UNREGISTER_MMIO_FILL": "unregister_mmio_fill",
}


@dataclass
class ChangeCost:
    #: per change (they are the same every time; the first change's are kept)
    memslot_creates: int
    memslot_deletes: int
    other_ops: dict[str, int]
    #: wall time of the whole change (host bridge, memory map, ioctls)
    seconds: Summary
    #: the part of it spent inside the counted ioctls, by ioctl (median over the changes)
    ioctl_seconds: dict[str, float]

    @property
    def memslot_ops(self) -> int:
        return self.memslot_creates + self.memslot_deletes

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["memslot_ops"] = self.memslot_ops
        d["seconds"] = self.seconds.as_dict()
        return d


@dataclass
class HotplugResult:
    backend: str
    strategy: str
    #: the segments' write policy for absent functions
    writes: str
    #: exits a guest write to an absent function costs under it (0: coalesced, 1: exits)
    exits_per_absent_write: int
    function: str
    changes: int
    punch: ChangeCost
    fill: ChangeCost

    def as_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "strategy": self.strategy,
            "writes": self.writes,
            "exits_per_absent_write": self.exits_per_absent_write,
            "function": self.function,
            "changes": self.changes,
            "punch": self.punch.as_dict(),
            "fill": self.fill.as_dict(),
        }


class IoctlCounter:
    """Counts and times the memory-layout ioctls of one Vm (as its observer), so a change's time can
    be split between memslots and zones."""

    def __init__(self, vm: Vm) -> None:
        self.counts: Counter[str] = Counter()
        self.seconds: dict[str, float] = {}
        vm.observer = self

    def __call__(self, ioctl: str, arg: object, seconds: float) -> None:
        if ioctl == "KVM_SET_USER_MEMORY_REGION":
            deletes = isinstance(arg, kvm_userspace_memory_region) and arg.memory_size == 0
            name = "memslot_delete" if deletes else "memslot_create"
        elif ioctl in OTHER_OPS:
            name = OTHER_OPS[ioctl]
        else:
            return
        self.counts[name] += 1
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def take(self) -> tuple[Counter[str], dict[str, float]]:
        """(counts, seconds) by ioctl since the last take."""
        taken = self.counts, self.seconds
        self.counts, self.seconds = Counter(), {}
        return taken


def free_slot_endpoint(spec: MachineFile) -> EndpointSpec:
    """An endpoint for device 0 of the first root port's secondary bus that has none (a free slot)."""
    topology = spec.topology
    used = {(e.bdf.segment, e.bdf.bus) for e in topology.endpoints}
    for port in topology.root_ports:
        if (port.bdf.segment, port.secondary) not in used:
            return EndpointSpec(
                Bdf(port.bdf.segment, port.secondary, 0, 0), 0x1AF4, 0x1041, 0x020000, name="hot-plugged"
            )
    raise BenchError(f"{spec.path}: no root port with a free slot to hot-plug into")


def _cost(taken: list[tuple[Counter[str], dict[str, float]]], seconds: list[float]) -> ChangeCost:
    first = taken[0][0]
    names = sorted({name for counts, _ in taken for name in counts})
    return ChangeCost(
        memslot_creates=first["memslot_create"],
        memslot_deletes=first["memslot_delete"],
        other_ops={name: first[name] for name in OTHER_OPS.values() if first[name]},
        seconds=Summary.of(seconds),
        ioctl_seconds={name: statistics.median(times.get(name, 0.0) for _, times in taken) for name in names},
    )


def with_writes(spec: MachineFile, writes: str) -> MachineFile:
    """`spec` with every segment's write policy set to `writes`."""
    topology = spec.topology
    segments = tuple(replace(s, writes=writes) for s in topology.segments)
    return replace(spec, topology=replace(topology, segments=segments))


def measure_hotplug(
    spec: MachineFile,
    config: Config,
    changes: int,
    kernel: Kernel,
    on_change: Callable[[], None] = lambda: None,
    writes: str = WRITES_DISCARD,
) -> HotplugResult:
    spec = with_writes(spec, writes)
    endpoint = free_slot_endpoint(spec)
    absent_gpa = spec.topology.segment(endpoint.bdf.segment).page_gpa(endpoint.bdf)
    try:
        machine = build_machine(
            spec, backend=config.backend, strategy=config.strategy, kernel=kernel.image,
            kernel_name=kernel.name, cmdline=GUEST_CMDLINE,
        )  # fmt: skip
    except MachineBuildError as e:
        raise BenchError(f"{config.label}: {e}") from e
    punch_counts, fill_counts, punch_seconds, fill_seconds = [], [], [], []
    with machine:
        zones = machine.memory.view.in_force.layout.zones
        exits_per_absent_write = 0 if any(z.contains(absent_gpa) for z in zones) else 1
        counter = IoctlCounter(machine.vm)
        bridge = machine.host_bridge
        for _ in range(changes):
            start = time.perf_counter()
            bridge.add_function(endpoint)
            punch_seconds.append(time.perf_counter() - start)
            punch_counts.append(counter.take())
            start = time.perf_counter()
            bridge.remove_function(endpoint.bdf)
            fill_seconds.append(time.perf_counter() - start)
            fill_counts.append(counter.take())
            on_change()
    return HotplugResult(
        backend=config.backend,
        strategy=config.strategy,
        writes=writes,
        exits_per_absent_write=exits_per_absent_write,
        function=str(endpoint.bdf),
        changes=changes,
        punch=_cost(punch_counts, punch_seconds),
        fill=_cost(fill_counts, fill_seconds),
    )


__all__ = ["HotplugResult", "WRITE_POLICIES", "measure_hotplug", "with_writes"]
