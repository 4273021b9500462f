"""What a hot-plug change costs each strategy: punching one function's ECAM page out of its hole (the
function appears) and filling it back (it leaves), through the host bridge and the machine's
HotplugWiring, as a running VMM would do it.

Counted by wrapping the VM's memslot and zone ioctls on the machine's `Vm` object (every layer calls
them through it): KVM_SET_USER_MEMORY_REGION creates (size > 0) and deletes (size 0), coalesced-MMIO
zones and MMIO fill devices (un)registered. Timed with the host clock around add_function /
remove_function (no guest runs: the change itself is measured, not what the guest sees next).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pcihole.bench.configs import Config
from pcihole.bench.errors import BenchError
from pcihole.bench.scan import GUEST_CMDLINE, Kernel
from pcihole.bench.summary import Summary
from pcihole.machine.builder import MachineBuildError, build_machine
from pcihole.machine.machinefile import MachineFile
from pcihole.pci.bdf import Bdf
from pcihole.pci.topology import EndpointSpec

#: Zone and fill-device ioctls; a backend without one simply has no such attribute.
OTHER_OPS = (
    "register_coalesced_mmio",
    "unregister_coalesced_mmio",
    "register_mmio_fill",
    "unregister_mmio_fill",
)


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
    function: str
    changes: int
    punch: ChangeCost
    fill: ChangeCost

    def as_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "strategy": self.strategy,
            "function": self.function,
            "changes": self.changes,
            "punch": self.punch.as_dict(),
            "fill": self.fill.as_dict(),
        }


class IoctlCounter:
    """Counts and times the memory-layout ioctls issued through one Vm object (instance attributes
    shadow the methods), so a change's time can be split between memslots and zones."""

    def __init__(self, vm: object) -> None:
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        original = vm.set_user_memory_region  # type: ignore[attr-defined]

        def set_user_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr):
            name = "memslot_delete" if memory_size == 0 else "memslot_create"
            start = time.perf_counter()
            try:
                return original(slot, flags, guest_phys_addr, memory_size, userspace_addr)
            finally:
                self.counts[name] += 1
                self.seconds[name] += time.perf_counter() - start

        vm.set_user_memory_region = set_user_memory_region  # type: ignore[attr-defined]
        for name in OTHER_OPS:
            if hasattr(vm, name):
                setattr(vm, name, self._counting(name, getattr(vm, name)))

    def _counting(self, name: str, method: Callable) -> Callable:
        def counted(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.counts[name] += 1
                self.seconds[name] += time.perf_counter() - start

        return counted

    def take(self) -> tuple[Counter[str], Counter[str]]:
        """(counts, seconds) by ioctl since the last take."""
        taken = self.counts, self.seconds
        self.counts, self.seconds = Counter(), Counter()
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


def _cost(taken: list[tuple[Counter[str], Counter[str]]], seconds: list[float]) -> ChangeCost:
    first = taken[0][0]
    names = sorted({name for counts, _ in taken for name in counts})
    return ChangeCost(
        memslot_creates=first["memslot_create"],
        memslot_deletes=first["memslot_delete"],
        other_ops={name: first[name] for name in OTHER_OPS if first[name]},
        seconds=Summary.of(seconds),
        ioctl_seconds={name: statistics.median(times[name] for _, times in taken) for name in names},
    )


def measure_hotplug(
    spec: MachineFile,
    config: Config,
    changes: int,
    kernel: Kernel,
    on_change: Callable[[], None] = lambda: None,
) -> HotplugResult:
    endpoint = free_slot_endpoint(spec)
    try:
        machine = build_machine(
            spec, backend=config.backend, strategy=config.strategy, kernel=kernel.image,
            kernel_name=kernel.name, cmdline=GUEST_CMDLINE,
        )  # fmt: skip
    except MachineBuildError as e:
        raise BenchError(f"{config.label}: {e}") from e
    punch_counts, fill_counts, punch_seconds, fill_seconds = [], [], [], []
    with machine:
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
        function=str(endpoint.bdf),
        changes=changes,
        punch=_cost(punch_counts, punch_seconds),
        fill=_cost(fill_counts, fill_seconds),
    )
