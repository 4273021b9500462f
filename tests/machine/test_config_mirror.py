"""Read-only mirrors of present functions' config spaces: no exit on reads, never a stale byte.

A guest (the table-driven test guest) runs random sequences of config writes with read-backs
(BAR sizing: all-ones then read; RW1C status bits; random registers; writes to absent functions,
which with writes="trap" set AER status in a root port), then reads every byte of every function;
the host hot-adds a function between two such tables (the root port's slot status changes without
any guest write). Every value the guest read under a mirroring strategy must equal what it read
under `exit`, where every access exits and is answered by the host bridge, on the same backend.
And the mirroring strategies must not exit on a single read of a present function.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from pcihole.hv import exits, x86_cpu_state
from pcihole.machine.builder import punched_hole
from pcihole.machine.bus import Bus
from pcihole.machine.dispatch import ExitHandler
from pcihole.machine.ecam_window import EcamWindow, HotplugWiring, segment_hole
from pcihole.machine.stats import RunStats
from pcihole.memory import GuestMemory, GuestRange, MemoryMap, Ram
from pcihole.pci.bdf import Bdf
from pcihole.pci.host_bridge import HostBridge
from pcihole.pci.topology import BarSpec, EndpointSpec, RootPortSpec, Segment, Topology
from tests.access_table_guest import ENTRY, WRITE, access_table_guest, pack_table, read_results
from tests.backends import BACKENDS, needs_kvm, open_hv
from tests.guestasm import assemble

ECAM = 0xE0000000
CODE, STACK, TABLE, PAGE_TABLES, RAM_SIZE = 0x1000, 0x8000, 0x10000, 0x100000, 2 << 20
MIRRORED = {"kvm": ("ro-filled", "ro-alias"), "model": ("ro-filled", "ro-alias", "native", "mmio-bus")}
CASES = [
    pytest.param(b, s, w, id=f"{b}-{s}-{w}", marks=[needs_kvm] if b == "kvm" else [])
    for b, strategies in MIRRORED.items()
    for s in strategies
    for w in ("discard", "trap", "exit")
]
HOT_ADDED = EndpointSpec(Bdf(0, 2, 0, 0), 0x1AF4, 0x1042, 0x010000, bars=(BarSpec(0, "mem32", 0x4000),))
ABSENT = [Bdf(0, 2, 3, 0), Bdf(0, 7, 0, 0), Bdf(0, 0, 9, 0)]  # below port 00:01.1, below no port, root bus


def topology(writes: str) -> Topology:
    return Topology(
        segments=(Segment(0, ECAM, 0, 15, writes=writes),),
        root_ports=(
            RootPortSpec(Bdf(0, 0, 1, 0), secondary=1, subordinate=1),
            RootPortSpec(Bdf(0, 0, 1, 1), secondary=2, subordinate=3),
        ),
        endpoints=(
            EndpointSpec(
                Bdf(0, 1, 0, 0), 0x1AF4, 0x1041, 0x020000,
                bars=(BarSpec(1, "mem32", 0x1000), BarSpec(4, "mem64", 0x4000, prefetchable=True)),
            ),
            EndpointSpec(Bdf(0, 0, 0x1F, 0), 0x8086, 0x2918, 0x060100),
            EndpointSpec(Bdf(0, 0, 0x1F, 3), 0x8086, 0x2930, 0x0C0500, bars=(BarSpec(4, "io", 0x20),)),
        ),
    )  # fmt: skip


def page(bdf: Bdf) -> int:
    return ECAM + (bdf.bus << 20 | bdf.device << 15 | bdf.function << 12)


class MirrorRig:
    """GuestMemory + HostBridge + ECAM window on a bus, wired as the machine builder wires them."""

    def __init__(self, backend: str, strategy: str, writes: str, map_budget: int | None = None) -> None:
        self.hv = open_hv(backend)
        self.vm = self.hv.create_vm()
        self.mem = GuestMemory(self.hv, self.vm, strategy, map_budget=map_budget)
        self.bridge = HostBridge(topology(writes))
        if self.mem.strategy.maps_mirrors:
            self.bridge.use_mirrors()
        (seg,) = self.bridge.segments
        regions = [Ram(GuestRange.from_size(0, RAM_SIZE), "ram")]
        regions += punched_hole(segment_hole(seg, self.bridge), self.bridge.present_pages(), self.bridge)
        self.mem.update(MemoryMap(regions))
        self.bridge.add_listener(HotplugWiring(self.bridge, self.mem))
        self.stats = RunStats()
        mmio = Bus("mmio")
        mmio.insert(
            EcamWindow(self.mem.view, self.bridge, self.stats), seg.window_base, seg.window_size, "ECAM"
        )
        self.handler = ExitHandler(mmio, Bus("port"), self.stats)
        self.code = assemble(access_table_guest(TABLE), bits=64, org=CODE)
        self.vcpu = self.vm.create_vcpu(0)

    def run_table(self, ops: list[tuple[int, int, int]]) -> tuple[list[int], Counter[str]]:
        self.mem.write_guest(CODE, self.code)
        self.mem.write_guest(TABLE, pack_table(ops))
        x86_cpu_state.enter_long_mode(
            self.vcpu, CODE, page_tables_gpa=PAGE_TABLES, write_guest=self.mem.write_guest, rsp=STACK
        )
        counts: Counter[str] = Counter()
        for _ in range(200_000):
            exit_ = self.vcpu.run()
            counts[type(exit_).__name__] += 1
            rest = self.mem.view.coalesced(self.vcpu.drain_coalesced_mmio())
            assert rest == []
            if isinstance(exit_, exits.Hlt):
                break
            assert isinstance(exit_, exits.MmioRead | exits.MmioWrite), exit_
            answer = self.handler.handle(exit_)
            if isinstance(exit_, exits.MmioRead):
                assert isinstance(answer, bytes)
                self.vcpu.complete_read(answer)
        else:
            raise AssertionError("the guest did not finish")
        raw = self.mem.read_guest(TABLE + 8, len(ops) * ENTRY.size)
        return read_results(raw, len(ops)), counts

    def close(self) -> None:
        # As Machine.close: the vCPU and the VM before the memory they map.
        self.vcpu.close()
        self.vm.close()
        self.mem.close()
        self.bridge.close_mirrors()
        self.hv.close()


def random_writes(rng: random.Random, present: list[Bdf], count: int) -> list[tuple[int, int, int]]:
    """Writes, each read back at once with the same size: BAR sizing, RW1C, random registers,
    and writes to absent functions."""
    ops = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.15:
            target = page(rng.choice(ABSENT))
            size = 4
            addr, value = target + rng.randrange(0, 0x100, 4), rng.getrandbits(32)
        else:
            target = page(rng.choice(present))
            if kind < 0.4:  # BAR sizing (type 1 headers have two BARs, then bus numbers)
                size, addr, value = 4, target + 0x10 + 4 * rng.randrange(6), 0xFFFFFFFF
            elif kind < 0.55:  # RW1C: the status register, all ones
                size, addr, value = 2, target + 0x06, 0xFFFF
            else:
                size = rng.choice((1, 2, 4))
                offset = rng.randrange(0, 0x200 if rng.random() < 0.8 else 0x1000, size)
                addr, value = target + offset, rng.getrandbits(8 * size)
        ops.append((addr, WRITE | size, value))
        ops.append((addr, size, 0))
    return ops


def read_everything(pages: list[int]) -> list[tuple[int, int, int]]:
    return [(p + off, 8, 0) for p in pages for off in range(0, 0x1000, 8)]


def scenario(rig: MirrorRig, seed: int) -> tuple[list[int], Counter[str], int]:
    """Random writes and read-backs; a full read; a hot-add; more writes; a full read again; a
    hot-remove; writes and a full read once more.
    Returns every value the guest read, the exits, and how many writes went to present pages."""
    rng = random.Random(seed)
    present = [fn.bdf for fn in rig.bridge.devices()]
    first = random_writes(rng, present, 60) + read_everything([page(b) for b in present + ABSENT])
    results, counts = rig.run_table(first)
    rig.bridge.add_function(HOT_ADDED)
    present.append(HOT_ADDED.bdf)
    second = random_writes(rng, present, 60) + read_everything([page(b) for b in present + ABSENT])
    more, more_counts = rig.run_table(second)
    rig.bridge.remove_function(HOT_ADDED.bdf)
    third = random_writes(rng, present[:-1], 20) + read_everything([page(b) for b in present + ABSENT])
    last, last_counts = rig.run_table(third)
    more, more_counts = more + last, more_counts + last_counts
    ops = first + second + third
    present_pages = {page(b) for b in present}
    writes_to_present = sum(1 for a, op, _ in ops if op & WRITE and a & ~0xFFF in present_pages)
    return results + more, counts + more_counts, writes_to_present


@pytest.mark.parametrize(("backend", "strategy", "writes"), CASES)
def test_mirrored_reads_equal_exit_reads_and_never_exit(backend, strategy, writes):
    outcomes = {}
    for name in ("exit", strategy):
        rig = MirrorRig(backend, name, writes)
        try:
            outcomes[name] = scenario(rig, seed=13)
        finally:
            rig.close()
    want, exit_counts, writes_to_present = outcomes["exit"]
    got, counts, _ = outcomes[strategy]
    mismatches = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b]
    assert mismatches == [], f"{len(mismatches)} reads differ from exit's, first at op {mismatches[0]}"
    assert exit_counts["MmioRead"] > 1000  # exit really exited on every read
    # Mirrored: no read exits; every write to a present function exits (the slot is read-only and
    # no coalesced zone covers it), so the emulation sees each one.
    assert counts["MmioRead"] == 0
    assert counts["MmioWrite"] >= writes_to_present


def test_the_mirror_page_is_the_config_space_and_blank_once_the_function_left():
    rig = MirrorRig("model", "ro-alias", "discard")
    try:
        mirror_page = rig.bridge.mirror_page(page(HOT_ADDED.bdf))
        assert mirror_page is not None
        fn = rig.bridge.add_function(HOT_ADDED)
        assert fn.config.read_int(0, 4) == 0x10421AF4
        assert rig.bridge._mirror is not None
        view = rig.bridge._mirror.page(page(HOT_ADDED.bdf))
        assert bytes(view[:4]) == bytes.fromhex("f41a4210")
        rig.bridge.remove_function(HOT_ADDED.bdf)
        assert bytes(view) == b"\xff" * 0x1000
        assert fn.config.read_int(0, 4) == 0x10421AF4  # the departed function keeps a private copy
    finally:
        rig.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_guest_reading_a_page_while_its_function_comes_and_goes_sees_fill_or_the_function(backend):
    """The hole contract's point 5 under remapping: one thread hot-adds and removes the function
    while the guest reads its vendor/device dword in a loop; every value is all-ones or the
    function's, never zeros or anything else."""
    rig = MirrorRig(backend, "ro-alias", "exit")
    reads = 400_000 if backend == "kvm" else 1_000_000
    addr = page(HOT_ADDED.bdf)
    source = f"""
    mov ${addr:#x}, %edi
    mov ${reads}, %ecx
    xor %r9, %r9
    xor %r10, %r10
again:
    movl (%rdi), %eax
    cmp $0xffffffff, %eax
    je fill
    cmp $0x10421af4, %eax
    je present
    inc %r9
    mov %eax, {TABLE + 8:#x}
    jmp next
fill:
    jmp next
present:
    inc %r10
next:
    dec %ecx
    jnz again
    mov %r9, {TABLE:#x}
    mov %r10, {TABLE + 16:#x}
    hlt
"""
    stop = threading.Event()
    toggles = 0

    def toggle() -> None:
        nonlocal toggles
        while not stop.is_set():
            rig.bridge.add_function(HOT_ADDED)
            time.sleep(0.002)  # let the guest see it (the vCPU runs without the GIL)
            rig.bridge.remove_function(HOT_ADDED.bdf)
            toggles += 1
            time.sleep(0.001)

    try:
        code = assemble(source, bits=64, org=CODE)
        rig.mem.write_guest(CODE, code)
        x86_cpu_state.enter_long_mode(
            rig.vcpu, CODE, page_tables_gpa=PAGE_TABLES, write_guest=rig.mem.write_guest, rsp=STACK
        )
        thread = threading.Thread(target=toggle)
        thread.start()
        try:
            exit_ = rig.vcpu.run()
        finally:
            stop.set()
            thread.join()
        assert isinstance(exit_, exits.Hlt), exit_
        bad = int.from_bytes(rig.mem.read_guest(TABLE, 8), "little")
        seen_present = int.from_bytes(rig.mem.read_guest(TABLE + 16, 8), "little")
        assert bad == 0, (
            f"{bad} reads saw neither fill nor the function (last {rig.mem.read_guest(TABLE + 8, 4).hex()})"
        )
        assert toggles > 0
        assert seen_present > 0  # the guest did see the function while it was there
    finally:
        rig.close()


def test_ro_alias_gives_mirrored_pages_slots_when_own_arenas_exceed_the_mapping_budget():
    # The 16 MiB window's own arena needs 256 alias mappings plus 2 per mirrored page: a budget of
    # 260 holds the shared arena (256) but not that, so the mirrored pages get slots of their own.
    outcomes = {}
    for name, budget in (("exit", None), ("ro-alias", 260)):
        rig = MirrorRig("model", name, "exit", map_budget=budget)
        try:
            if name == "ro-alias":
                now = rig.mem.view.in_force
                assert now.layout.pages == ()
                page_slots = [s for s in now.slots if s.size == 0x1000]
                assert len(page_slots) == len(rig.bridge.present_pages())
            outcomes[name] = scenario(rig, seed=7)
        finally:
            rig.close()
    assert outcomes["ro-alias"][0] == outcomes["exit"][0]
    assert outcomes["ro-alias"][1]["MmioRead"] == 0
