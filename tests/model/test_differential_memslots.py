"""Differential test: random memslot / dirty-log call sequences give the same result on both backends.

Each example applies up to 40 operations to a fresh VM on the model and on /dev/kvm, and every step
must end the same way: success on both (and the same bitmap for a GET), or the same errno. Values
are drawn to hit every check of kvm_set_memory_region: misaligned sizes and addresses, wrap-around,
HVAs at the user address limit, slot ids and as_id bits at the limits, sizes at
KVM_MEM_MAX_NR_PAGES, gpas at kvm_mmu_max_gfn, overlaps, moves, READONLY / LOG_DIRTY toggles and
unknown flag bits. Bit 2 is never sent: on the real kernel it is KVM_MEM_GUEST_MEMFD.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pcihole.host.mman import HostMapping
from pcihole.hv.model.memslots import TASK_SIZE_MAX

pytestmark = pytest.mark.kvm

P = 0x1000
MAX_PAGES = (1 << 31) - 1
GPA_MAX = 1 << 52  # kvm_mmu_max_gfn() + 1 page, on this host

slot_ids = st.sampled_from([0, 1, 2, 3, 7, 10, 32763, 32764, 32767, 65535, 1 << 16, (1 << 16) | 1, 1 << 31])
flag_values = st.sampled_from([0, 1, 2, 3, 0, 0, 1, 8, 1 << 31, 0x13])
gpas = st.one_of(
    st.sampled_from([0, P, 0x10000, 0x100000, 0xC0000000, 1 << 32, GPA_MAX - 2 * P, GPA_MAX - P, GPA_MAX]),
    st.sampled_from([2**64 - P, 2**64 - 0x10000, 0x800, 0x100001]),
    st.integers(0, 64).map(lambda n: n * P),
)
sizes = st.one_of(
    st.sampled_from([0, P, 2 * P, 0x10000, 0x100000, 0x200000]),
    # The kernel spends ~1.8 ms per 2**20 pages creating a slot (28 s at KVM_MEM_MAX_NR_PAGES), so
    # the sizes that succeed stay at or below 2**22 pages; the limit itself is in test_memslots.py.
    st.sampled_from([(MAX_PAGES + 1) * P, 1 << 34, 0x800, P + 1, 2**64 - P, 1 << 63]),
    st.integers(1, 64).map(lambda n: n * P),
)
hva_choices = st.one_of(
    st.tuples(st.integers(0, 2), st.integers(0, 15)).map(lambda t: ("map", t[0], t[1])),
    st.sampled_from(
        [
            ("abs", 0),
            ("abs", 0x1000),
            ("abs", TASK_SIZE_MAX - P),
            ("abs", TASK_SIZE_MAX),
            ("abs", 1 << 63),
            ("abs", 0x7FFFFFFFE000),
            ("misaligned", 0),
        ]
    ),
)

set_op = st.tuples(st.just("set"), slot_ids, flag_values, gpas, sizes, hva_choices)
# Mostly-valid creates in a small window, so that slots exist, overlap, log and get moved.
friendly_set_op = st.tuples(
    st.just("set"),
    st.integers(0, 3),
    st.sampled_from([0, 1, 1, 1, 2, 3]),
    st.integers(0, 7).map(lambda n: n * 0x10000),
    st.sampled_from([P, 2 * P, 4 * P, 16 * P, 0x20000, 65 * P]),
    st.tuples(st.integers(0, 2), st.integers(0, 15)).map(lambda t: ("map", t[0], t[1])),
)
friendly_slot = st.integers(0, 3)
delete_op = st.tuples(st.just("delete"), st.one_of(friendly_slot, slot_ids))
move_op = st.tuples(
    st.just("move"),
    st.one_of(friendly_slot, slot_ids),
    st.one_of(gpas, st.integers(0, 9).map(lambda n: n * 0x8000)),
)
toggle_op = st.tuples(st.just("toggle"), st.one_of(friendly_slot, slot_ids), st.sampled_from([1, 1, 2, 3]))
get_op = st.tuples(st.just("get"), st.one_of(friendly_slot, friendly_slot, slot_ids))
clear_op = st.tuples(
    st.just("clear"),
    st.one_of(friendly_slot, friendly_slot, slot_ids),
    st.sampled_from([0, 0, 0, 1, 64, 128, 1 << 20]),
    st.sampled_from([0, 1, 2, 4, 10, 16, 32, 64, 65, 128, 256, 1 << 31]),
    st.binary(min_size=0, max_size=16),
)
cap_op = st.tuples(st.just("manual_protect"), st.sampled_from([0, 1, 2, 3, 4]))
operations = st.lists(
    st.one_of(
        set_op, friendly_set_op, friendly_set_op, delete_op, move_op, toggle_op, get_op, clear_op, cap_op
    ),
    min_size=1,
    max_size=40,
)


@pytest.fixture(scope="module")
def host_mappings():
    maps = [HostMapping.anonymous(0x10000 * 16, name=f"diff {i}") for i in range(3)]
    yield maps
    for m in maps:
        m.close()


def outcome(call):
    try:
        value = call()
    except OSError as e:
        return ("errno", e.errno)
    if isinstance(value, bytes | bytearray):
        return ("ok", bytes(value))
    return ("ok", None)


def resolve_hva(choice, size, maps):
    kind = choice[0]
    if kind == "map":
        return maps[choice[1]].addr + choice[2] * 0x10000
    if kind == "misaligned":
        return maps[0].addr + 0x10
    if choice[1] == TASK_SIZE_MAX - P and size:
        return TASK_SIZE_MAX - size  # exactly at the limit
    return choice[1]


def apply(vm, op, model_vm, maps):
    """Turn one drawn operation into a call on `vm`; slot state is read from the model (same on both)."""
    kind = op[0]
    if kind == "set":
        _, slot, flags, gpa, size, hva = op
        return lambda: vm.set_user_memory_region(slot, flags, gpa, size, resolve_hva(hva, size, maps))
    if kind == "delete":
        return lambda: vm.set_user_memory_region(op[1], 0, 0, 0, 0)
    old = model_vm.memslots.by_id.get(op[1] & 0xFFFF) if kind in ("move", "toggle", "get") else None
    if kind == "move":
        if old is None:
            return lambda: vm.set_user_memory_region(op[1], 0, op[2], P, maps[0].addr)
        return lambda: vm.set_user_memory_region(op[1], old.flags, op[2], old.size, old.userspace_addr)
    if kind == "toggle":
        if old is None:
            return lambda: vm.set_user_memory_region(op[1], op[2], 0, P, maps[1].addr)
        return lambda: vm.set_user_memory_region(
            op[1], old.flags ^ op[2], old.gpa, old.size, old.userspace_addr
        )
    if kind == "get":
        if old is not None and old.npages > 1 << 16:
            return None  # a 256 MiB bitmap per call: too slow for a property test
        return lambda: vm.get_dirty_log(op[1])
    if kind == "clear":
        _, slot, first, num, bitmap = op
        return lambda: vm.clear_dirty_log(slot, first, num, bitmap)
    if kind == "manual_protect":
        from pcihole.hv.uapi import KvmCap

        return lambda: vm.enable_cap(KvmCap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, op[1])
    raise AssertionError(op)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
def test_memslot_sequences_match_the_kernel(ops, kvm_hv, model_hv, host_mappings):
    kvm_vm = kvm_hv.create_vm()
    model_vm = model_hv.create_vm()
    try:
        for step, op in enumerate(ops):
            kvm_call = apply(kvm_vm, op, model_vm, host_mappings)
            model_call = apply(model_vm, op, model_vm, host_mappings)
            if kvm_call is None:
                continue
            expected = outcome(kvm_call)
            got = outcome(model_call)
            assert got == expected, f"step {step}: {op}: kernel {expected}, model {got}"
            event(f"{op[0]} -> {expected[0]} {expected[1] if expected[0] == 'errno' else ''}")
    finally:
        kvm_vm.close()
        model_vm.close()
        model_hv.vms.clear()
