"""What the holes cost, measured: backing bytes, memslots, mappings, exits of a full ECAM scan (KVM tier
for kvm, and the model where it is in the tree).

The scan guest reads the vendor ID (offset 0, 4 bytes) of function 0 of every device of every bus
of a 256-bus ECAM, as a brute-force OS scan does: 256 * 32 = 8192 reads. Ten functions are present
(pages punched out of the hole, answered by fake functions).
"""

from __future__ import annotations

import os

import pytest

from pcihole.hv import exits
from pcihole.memory.accounting import process_mappings, resident_bytes, vm_pte_bytes
from tests.backends import BACKEND_STRATEGIES
from tests.guest_runner import ECAM, ECAM_SIZE, answer_mmio
from tests.memory.fake_function import FakeFunction

MiB = 1 << 20
FOUND = 0x9000  # the guest counts the slots whose vendor ID is not 0xffff
PRESENT = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0), (16, 5), (128, 31), (255, 0)]

SCAN = f"""
    mov ${ECAM}, %esi
    mov ${ECAM + ECAM_SIZE}, %edi
    xor %ecx, %ecx
1:  movl (%rsi), %eax
    cmp $0xffff, %ax
    je 2f
    inc %ecx
2:  add $0x8000, %esi
    cmp %edi, %esi
    jb 1b
    mov %ecx, {FOUND}
    hlt
"""


def run_scan(g) -> dict:
    mem = g.mem
    g.start()
    counted = {"MmioRead": 0, "MmioWrite": 0, "total": 0}
    while True:
        e = g.vcpu.run()
        counted["total"] += 1
        mem.view.coalesced(g.vcpu.drain_coalesced_mmio())
        if isinstance(e, exits.Hlt):
            break
        counted[type(e).__name__] += 1
        assert answer_mmio(mem.view, g.vcpu, e), e
    return counted


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_full_scan_exits_and_backing(table_guest, backend, strategy):
    g = table_guest(backend, strategy, source=SCAN)
    for bus, dev in PRESENT:
        g.mem.punch_page(ECAM + (bus << 20 | dev << 15), FakeFunction(), f"{bus:02x}:{dev:02x}.0")
    pte_before = vm_pte_bytes()
    counted = run_scan(g)
    stats = g.mem.stats()
    assert int.from_bytes(g.mem.read_guest(FOUND, 4), "little") == len(PRESENT)
    # Present functions always exit (the VMM answers them); absent slots exit only with `exit`.
    absent = 256 * 32 - len(PRESENT)
    if strategy == "exit":
        assert counted["MmioRead"] == 256 * 32
        assert stats.exits.hole_reads == absent
    else:
        assert counted["MmioRead"] == len(PRESENT)
        assert stats.exits.hole_reads == 0
    assert stats.exits.mmio_reads == len(PRESENT)
    # Slots: RAM + one per hole run (10 punched pages cut the hole into <= 11 runs).
    # 10 punched pages cut the hole into 10 runs: (0,0) sits at the very start of the hole, so no run
    # precedes it; every other page, (255,0) included, is followed by one.
    runs = 10
    expected_hole_slots = {"exit": 0, "mmio-bus": 0}.get(strategy, runs)
    assert stats.hole_memslots == expected_hole_slots and stats.memslots == 1 + expected_hole_slots
    if strategy == "ro-alias":
        assert stats.hole_backing_bytes == 64 * 1024  # one 64 KiB memfd, however many slots
        assert stats.hole_mappings == 4096
        assert stats.coalesced_zones == runs
    elif strategy == "ro-filled":
        # Private buffers: the whole hole is resident (that is the point of this strategy).
        assert stats.hole_backing_bytes == ECAM_SIZE
    else:
        assert stats.hole_backing_bytes == 0
    print(
        f"\n{backend}/{strategy}: exits={counted} memslots={stats.memslots} hole_memslots={stats.hole_memslots} "
        f"backing={stats.hole_backing_bytes} mappings={stats.hole_mappings} "
        f"VmPTE +{(vm_pte_bytes() - pte_before) // 1024} KiB"
    )


def test_resident_bytes_counts_touched_pages_only():
    from pcihole.host.mman import HostMapping

    with HostMapping.anonymous(64 * 4096) as m:
        assert resident_bytes(m.addr, m.size) == 0
        for i in range(0, 64, 4):
            m.write(i * 4096, b"x")
        assert resident_bytes(m.addr, m.size) == 16 * 4096


def test_process_counters_are_read_from_proc():
    assert vm_pte_bytes() > 0
    n = process_mappings()
    from pcihole.host.mman import HostMapping

    with HostMapping.anonymous(4096, prot=1):
        assert process_mappings() == n + 1
    assert os.path.exists("/proc/self/status")
