"""The hole contract (docs/design.md, points 1-4), checked by guest code, for every strategy on every backend.

Point 5 (hot-add/remove while the guest reads) is tests/memory/test_punch_fill.py.
"""

from __future__ import annotations

import pytest

from pcihole.hv import open_backend
from pcihole.memory import GuestMemory, GuestRange, Hole, StrategyUnavailable
from tests.access_table_guest import WRITE
from tests.backends import BACKEND_STRATEGIES, BACKENDS
from tests.guest_runner import ECAM, ECAM_SIZE, MiB
from tests.memory.fake_function import FakeFunction, bytes_written, expected_bytes

# Strategies under which a read of an absent byte never exits to userspace.
NO_READ_EXITS = {"ro-filled", "ro-alias", "native", "mmio-bus"}
# (addr offset into the hole, size): aligned, unaligned, and across the 4 KiB / 1 MiB boundaries.
READS = [
    (0, 1),
    (0, 2),
    (0, 4),
    (0, 8),
    (1, 1),
    (3, 2),
    (5, 4),
    (7, 8),
    (0xFFF, 1),
    (0xFFE, 4),
    (0xFFC, 8),
    (0xFFF, 2),  # straddle a page inside the hole
    (MiB - 3, 8),  # straddle a bus
    (ECAM_SIZE - 8, 8),
    (ECAM_SIZE - 1, 1),  # the very end
    (0x12345, 4),
    (0x8000, 4),
    (0xF8000, 4),  # a few device slots' vendor IDs
]


def _fill_value(fill: int, size: int) -> int:
    return int.from_bytes(bytes([fill]) * size, "little")


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_reads_of_every_size_return_the_fill(table_guest, backend, strategy):
    g = table_guest(backend, strategy)
    out = g.run_table([(ECAM + off, size, 0) for off, size in READS])
    assert out.results == [_fill_value(0xFF, size) for _, size in READS]
    if strategy in NO_READ_EXITS:
        assert out.mmio_reads == 0, f"{strategy} promises no exit for absent reads: {out.exits}"
    else:
        # exit: one exit per access, two for an access straddling pages (KVM splits it per page).
        assert out.mmio_reads >= len(READS)
        assert g.mem.view.counters.hole_reads == out.mmio_reads


@pytest.mark.parametrize(("backend", "strategy"), [p for p in BACKEND_STRATEGIES if p.values[1] != "native"])
def test_fill_value_is_configurable(table_guest, backend, strategy):
    g = table_guest(backend, strategy, holes=[Hole(GuestRange.from_size(ECAM, 16 * MiB), "h", fill=0xA5)])
    reads = [(0, 1), (0, 2), (3, 4), (0xFFC, 8), (16 * MiB - 8, 8)]
    out = g.run_table([(ECAM + off, size, 0) for off, size in reads])
    assert out.results == [_fill_value(0xA5, size) for _, size in reads]


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_refuses_a_fill_other_than_0xff(backend):
    hv = open_backend(backend)
    vm = hv.create_vm()
    try:
        if backend == "kvm":
            with pytest.raises(StrategyUnavailable, match="native needs KVM_CAP_PCI_HOLE_MEM"):
                GuestMemory(hv, vm, "native")
            with pytest.raises(StrategyUnavailable, match="mmio-bus needs KVM_CAP_MMIO_FILL"):
                GuestMemory(hv, vm, "mmio-bus")
            assert GuestMemory(hv, vm, "auto").strategy.name == "ro-alias"
            return
        mem = GuestMemory(hv, vm, "native")
        from pcihole.memory import MemoryMap

        with pytest.raises(StrategyUnavailable, match="KVM_MEM_PCI_HOLE reads always return 0xff"):
            mem.update(MemoryMap([Hole(GuestRange.from_size(ECAM, MiB), fill=0)]))
        assert GuestMemory(hv, vm, "auto").strategy.name == "native"
    finally:
        vm.close()
        hv.close()


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_discarded_writes_change_nothing_and_cost_no_exit(table_guest, backend, strategy):
    g = table_guest(backend, strategy)
    writes = [
        (ECAM + off, size, 0x0123456789ABCDEF)
        for off, size in [(0, 1), (2, 2), (4, 4), (8, 8), (0x2001, 4), (0xFFC, 8), (MiB, 4)]
    ]
    ops = []
    for addr, size, value in writes:
        ops += [(addr, WRITE | size, value), (addr, size, 0)]
    out = g.run_table(ops)
    assert out.results[1::2] == [_fill_value(0xFF, s) for _, s, _ in writes]
    assert out.mmio_writes == 0, f"discard-writes exited: {out.exits}"
    c = g.mem.view.counters
    if strategy == "mmio-bus":
        # Dropped by the in-kernel device: not even a ring entry.
        assert out.coalesced == [] and c.hole_writes_coalesced == 0
    else:
        # Every written byte went to the ring exactly once (backends may split an access).
        assert bytes_written((w.addr, w.data) for w in out.coalesced) == expected_bytes(writes)
        assert c.hole_writes_coalesced == len(out.coalesced) >= len(writes)
    assert c.hole_writes_trapped == 0 and c.hole_writes_discarded == 0


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_trapped_writes_reach_the_trap_handler_once_each(table_guest, backend, strategy):
    seen: list[tuple[int, bytes]] = []
    hole = Hole(
        GuestRange.from_size(ECAM, ECAM_SIZE),
        "ecam",
        writes="trap",
        on_write=lambda a, d: seen.append((a, d)),
    )
    g = table_guest(backend, strategy, holes=[hole])
    writes = [(ECAM + 0x10, 4, 0xDEADBEEF), (ECAM + 0x3001, 1, 0x5A), (ECAM + 0x208, 8, 0x1122334455667788)]
    ops = []
    for addr, size, value in writes:
        ops += [(addr, WRITE | size, value), (addr, size, 0)]
    out = g.run_table(ops)
    assert bytes_written(seen) == expected_bytes(writes)
    assert out.results[1::2] == [_fill_value(0xFF, s) for _, s, _ in writes]
    assert out.mmio_writes == len(seen) >= len(writes)
    assert out.coalesced == [], "trap-holes must not have a coalesced zone"


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_accesses_straddling_a_hole_and_a_function_get_each_byte_right(table_guest, backend, strategy):
    g = table_guest(backend, strategy)
    fn = FakeFunction()
    page = ECAM + 3 * MiB + 0x8000  # bus 3, device 1, function 0
    g.mem.punch_page(page, fn, "03:01.0")
    reads = [
        (page, 4),
        (page, 8),
        (page + 0xFFC, 4),  # inside the function
        (page - 4, 8),
        (page - 1, 2),
        (page - 2, 4),  # hole -> function
        (page + 0xFFC, 8),
        (page + 0xFFF, 2),
        (page + 0xFFE, 4),  # function -> hole
        (page - 8, 8),
        (page + 0x1000, 8),  # the neighbouring hole bytes
    ]
    out = g.run_table([(a, s, 0) for a, s in reads])

    def expected(addr: int, size: int) -> int:
        data = bytes(
            fn.byte(a - page) if page <= a < page + 0x1000 else 0xFF for a in range(addr, addr + size)
        )
        return int.from_bytes(data, "little")

    assert [hex(r) for r in out.results] == [hex(expected(a, s)) for a, s in reads]
    # Writes across the boundary: the function sees only its own bytes; the hole part is dropped.
    fn.writes.clear()
    g.run_table([(page - 2, WRITE | 4, 0xA1B2C3D4), (page + 0xFFE, WRITE | 4, 0x01020304)])
    assert bytes_written((page + off, d) for off, d in fn.writes) == {
        page: 0xB2,
        page + 1: 0xA1,
        page + 0xFFE: 0x04,
        page + 0xFFF: 0x03,
    }


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_unaligned_hole_edges_read_the_fill(table_guest, backend, strategy):
    """A hole that does not start or end on a page: its partial pages are answered by exits."""
    fn = FakeFunction()
    from pcihole.memory import Mmio

    # [ECAM, ECAM+0x800) Mmio, [ECAM+0x800, ECAM+1MiB+0x400) hole, then Mmio again.
    hole = Hole(GuestRange(ECAM + 0x800, ECAM + MiB + 0x3FF), "odd")
    left = Mmio(GuestRange(ECAM, ECAM + 0x7FF), "l", handler=fn)
    right = Mmio(GuestRange(ECAM + MiB + 0x400, ECAM + MiB + 0xFFF), "r", handler=fn)
    g = table_guest(backend, strategy, holes=[hole, left, right])
    reads = [(ECAM + 0x7FC, 8), (ECAM + 0x800, 4), (ECAM + 0x5000, 4), (ECAM + MiB + 0x3FC, 8)]
    out = g.run_table([(a, s, 0) for a, s in reads])
    assert out.results[1:3] == [0xFFFFFFFF, 0xFFFFFFFF]
    assert out.results[0] == int.from_bytes(fn.bytes_at(0x7FC, 4) + b"\xff" * 4, "little")
    assert out.results[3] == int.from_bytes(b"\xff" * 4 + fn.bytes_at(0, 4), "little")
    if strategy in NO_READ_EXITS and backend == "kvm":
        # The whole pages inside the hole never exit: only ECAM+0x800 (partial page) and the two
        # straddles do. (The model's Unicorn CPU widens unaligned MMIO reads into aligned 4-byte
        # pieces, so it makes more, still correctly answered, exits.)
        assert g.mem.view.counters.hole_reads == 3


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_strategy_reports_itself(table_guest, backend, strategy):
    g = table_guest(backend, strategy)
    stats = g.mem.stats()
    assert stats.strategy == strategy
    expected_hole_slots = {"exit": 0, "mmio-bus": 0}.get(strategy, 1)
    assert stats.hole_memslots == expected_hole_slots
    assert stats.memslots == 1 + expected_hole_slots


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_alias_backing_of_a_live_vm_is_sealed(table_guest, backend):
    """Hole contract point 4: the VMM itself cannot change the bytes behind the holes."""
    import errno
    import os

    from pcihole.host.mman import PROT_READ, PROT_WRITE, mprotect_raw

    g = table_guest(backend, "ro-alias")
    strategy = g.mem.strategy
    (arena,) = strategy.arenas
    (fd,) = strategy.memfd_fds()
    with pytest.raises(OSError) as e:
        os.pwrite(fd, b"\0\0\0\0", 0)
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        mprotect_raw(arena.addr, 4096, PROT_READ | PROT_WRITE)
    assert e.value.errno == errno.EACCES  # VM_MAYWRITE is clear on a write-sealed shared mapping
    out = g.run_table([(ECAM, 8, 0)])
    assert out.results == [2**64 - 1]
