"""No leaks: VMs created, run and closed one after another in one process leave no file descriptor,
no host mapping and no memslot behind.

Measured from /proc/self/fd (exact count) and /proc/self/maps (the mappings pcihole makes are
recognisable: kvm-vcpu, memfd:pcihole-fill, and anonymous RAM/arena mappings; the total may move a
little with Python's allocator, so it gets a small slack, the recognisable ones none). Memslots:
after GuestMemory.close() the VM must have none left: on kvm a probe slot over the whole low 4 GiB
(a PROT_NONE reservation, no memory) is created, which fails with EEXIST if any slot is left; on
the model the VM's slot table is empty.

1000 full `build_machine` runs on kvm would take about a minute here, so: 1000 VMs at the level below
(GuestMemory with RAM and a 16 MiB hole with a punched page, one vCPU running a tiny guest to HLT,
rotating through the kvm strategies), then 100 full build_machine + run + close with a tiny PVH
kernel on the default machine (rotating strategies): 200 on kvm; on the model 1000 and 300.
"""

from __future__ import annotations

import gc
import os

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import exits, open_backend, x86_cpu_state
from pcihole.machine.builder import build_machine
from pcihole.machine.dispatch import StopReason
from pcihole.machine.machinefile import load_default
from pcihole.memory import GuestMemory, GuestRange, Hole, MemoryMap, Ram
from tests.backends import STRATEGIES_BY_BACKEND
from tests.guest_runner import answer_mmio, pvh_kernel
from tests.guestasm import assemble

MiB = 1 << 20
GiB = 1 << 30
HOLE = 0xE0000000
CODE = 0x1000
OURS = ("kvm", "memfd:pcihole", "pcihole")
# A guest that reads the hole and a punched page, writes both, and halts.
HV_GUEST = f"""
    mov {HOLE:#x}, %eax
    mov {HOLE + 0x3000:#x}, %eax
    movl $1, {HOLE + 0x5000:#x}
    hlt
"""
# PVH: read ECAM's first dword, then debug-exit with status 0.
PVH_GUEST = bytes.fromhex("a1 00 00 00 e0 b0 00 e6 f4 f4".replace(" ", ""))


class Page:
    def read(self, offset: int, size: int) -> bytes:
        return b"\x5a" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


def snapshot() -> tuple[int, int, list[str]]:
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    ours = sorted(line.split(None, 5)[-1] for line in maps if any(w in line for w in OURS))
    return fds, len(maps), ours


def assert_same(before, after, what: str) -> None:
    fds0, maps0, ours0 = before
    fds1, maps1, ours1 = after
    assert fds1 == fds0, f"{what}: {fds1 - fds0} file descriptors leaked"
    assert ours1 == ours0, f"{what}: pcihole/kvm mappings left: {sorted(set(ours1) - set(ours0))[:5]}"
    assert maps1 <= maps0 + 16, f"{what}: {maps1 - maps0} more mappings than before"


def assert_no_memslot_left(hv, vm, memory) -> None:
    assert memory.slot_table == {}
    assert memory.slots.free == memory.slots.limit
    if hv.name == "model":
        assert len(vm.memslots) == 0
        return
    # A slot over all of [0, 4 GiB) overlaps any slot left there: EEXIST (kvm_check_memslot_overlap).
    with HostMapping.reserve(4 * GiB, name="probe") as probe:
        vm.set_user_memory_region(0, 0, 0, 4 * GiB, probe.addr)
        vm.set_user_memory_region(0, 0, 0, 0, probe.addr)


def one_hv_vm(hv, strategy: str, code: bytes) -> None:
    vm = hv.create_vm()
    try:
        mem = GuestMemory(hv, vm, strategy)
        mem.update(
            MemoryMap(
                [
                    Ram(GuestRange.from_size(0, 2 * MiB), "ram"),
                    Hole(GuestRange.from_size(HOLE, 16 * MiB), "h"),
                ]
            )
        )
        mem.punch_page(HOLE + 0x3000, Page(), "fn")
        mem.write_guest(CODE, code)
        vcpu = vm.create_vcpu(0)
        x86_cpu_state.enter_protected_mode_flat(vcpu, CODE, esp=0x8000)
        for _ in range(100):
            e = vcpu.run()
            mem.view.coalesced(vcpu.drain_coalesced_mmio())
            if isinstance(e, exits.Hlt):
                break
            assert answer_mmio(mem.view, vcpu, e), e
        else:
            raise AssertionError("the guest did not halt")
        mem.close()
        assert_no_memslot_left(hv, vm, mem)
    finally:
        vm.close()


def run_hv_vms(backend: str, count: int) -> None:
    code = assemble(HV_GUEST, bits=32, org=CODE)
    strategies = STRATEGIES_BY_BACKEND[backend]
    hv = open_backend(backend)
    try:
        for i in range(len(strategies)):  # warm-up: imports, caches, the allocator's first arenas
            one_hv_vm(hv, strategies[i], code)
        before = snapshot()
        for i in range(count):
            one_hv_vm(hv, strategies[i % len(strategies)], code)
        assert_same(before, snapshot(), f"{count} {backend} VMs")
    finally:
        hv.close()


def one_machine(backend: str, strategy: str, spec, kernel: bytes) -> None:
    m = build_machine(spec, backend=backend, strategy=strategy, kernel=kernel, kernel_name="tiny")
    with m:
        result = m.run(timeout=30)
        assert result.stop.reason == StopReason.DEBUG_EXIT and result.stop.status == 0, result.stop
        m.memory.close()
        assert_no_memslot_left(m.hv, m.vm, m.memory)


def run_machines(backend: str, count: int) -> None:
    spec, kernel = load_default(), pvh_kernel(PVH_GUEST)
    strategies = STRATEGIES_BY_BACKEND[backend]
    for s in strategies:
        one_machine(backend, s, spec, kernel)
    before = snapshot()
    for i in range(count):
        one_machine(backend, strategies[i % len(strategies)], spec, kernel)
    assert_same(before, snapshot(), f"{count} {backend} machines")


@pytest.mark.slow
@pytest.mark.kvm
def test_1000_kvm_vms_leave_nothing_behind():
    run_hv_vms("kvm", 1000)


@pytest.mark.slow
@pytest.mark.kvm
def test_200_kvm_machines_leave_nothing_behind():
    run_machines("kvm", 200)


@pytest.mark.slow
def test_1000_model_vms_leave_nothing_behind():
    run_hv_vms("model", 1000)


@pytest.mark.slow
def test_300_model_machines_leave_nothing_behind():
    run_machines("model", 300)
