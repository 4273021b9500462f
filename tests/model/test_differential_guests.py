"""The same small guests on the model and on /dev/kvm: same exits, in the same order, same values.

Each guest is flat 32-bit code (guest_runner.py); the comparison covers every exit, the coalesced
writes drained after each exit, the general registers at the end, the bytes the guest stored in
RAM, and (where the guest logs) the dirty bitmap.
"""

from __future__ import annotations

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from pcihole.hv.uapi import KVM_COALESCED_MMIO_MAX, KvmMemFlag
from tests.guest_runner import RAM_BYTES, close_run, run_guest

pytestmark = pytest.mark.kvm

RO_GPA = 0x200000
RO_BYTES = 0x4000
ZONE_GPA = 0x300000
LOG_GPA = 0x400000
LOG_PAGES = 70

REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip")


def ro_slot(vm):
    """Slot 1: a READONLY slot over host pages filled with a pattern; slot 2: a logging RAM slot."""
    ro = HostMapping.anonymous(RO_BYTES, name="ro")
    ro.write(0, bytes(range(256)) * (RO_BYTES // 256))
    vm.set_user_memory_region(1, KvmMemFlag.KVM_MEM_READONLY, RO_GPA, RO_BYTES, ro.addr)
    logged = HostMapping.anonymous(LOG_PAGES * 0x1000, name="logged")
    vm.set_user_memory_region(2, KvmMemFlag.KVM_MEM_LOG_DIRTY_PAGES, LOG_GPA, LOG_PAGES * 0x1000, logged.addr)
    return ro, logged


def with_zones(vm):
    keep = ro_slot(vm)
    vm.register_coalesced_mmio(ZONE_GPA, 0x100)  # unbacked gpa
    vm.register_coalesced_mmio(RO_GPA + 0x1000, 0x10)  # over the read-only slot
    vm.register_coalesced_mmio(0x80, 4, pio=True)
    return keep


GUESTS = {
    "ram": """
        movl $0x11223344, 0x2000
        movw $0x5566, 0x2004
        movb $0x77, 0x2006
        mov 0x2000, %eax
        mov 0x2004, %ebx
        hlt
    """,
    "unbacked_mmio": """
        mov 0x100000, %eax
        movw 0x100010, %bx
        movb 0x100021, %cl
        movl $0xcafef00d, 0x100100
        movw $0xbeef, 0x100200
        movb $0x42, 0x100300
        mov %eax, 0x2000
        mov %ebx, 0x2004
        mov %ecx, 0x2008
        hlt
    """,
    "readonly_slot": """
        mov 0x200010, %eax
        movzbl 0x200fff, %ebx
        movl $0x12345678, 0x200020
        mov 0x200020, %ecx
        movb $1, 0x203fff
        mov %eax, 0x2000
        mov %ebx, 0x2004
        mov %ecx, 0x2008
        hlt
    """,
    "port_io": """
        mov $0x5a, %al
        out %al, $0x70
        mov $0x1234, %ax
        out %ax, $0x72
        mov $0x3f8, %dx
        mov $0x89abcdef, %eax
        out %eax, %dx
        in $0x71, %al
        mov %eax, %ebx
        in (%dx), %ax
        mov %ebx, 0x2000
        mov %eax, 0x2004
        hlt
    """,
    "hlt_twice_then_ud2": """
        hlt
        mov $1, %eax
        hlt
        ud2
    """,
    "dirty_log": """
        movl $1, 0x400000
        movl $2, 0x401ffc
        movb $3, 0x403000
        movl $4, 0x43f000
        movl $5, 0x445ffc
        mov 0x444000, %eax
        hlt
    """,
}


@pytest.mark.parametrize("name", sorted(GUESTS))
def test_guest_matches_kvm(name, kvm_hv, model_hv):
    source = GUESTS[name]
    runs = {}
    for label, hv in (("kvm", kvm_hv), ("model", model_hv)):
        run = run_guest(hv, source, setup=ro_slot, max_exits=20)
        run.dirty = run.vm.get_dirty_log(2)
        runs[label] = run
    try:
        kvm, model = runs["kvm"], runs["model"]
        assert model.exits == kvm.exits
        assert model.exits and isinstance(model.exits[-1], exits.Hlt | exits.Shutdown)
        assert {r: getattr(model.regs, r) for r in REGS} == {r: getattr(kvm.regs, r) for r in REGS}
        assert model.results == kvm.results
        assert model.dirty == kvm.dirty
        assert model.keep[0].read(0, RO_BYTES) == kvm.keep[0].read(0, RO_BYTES)  # RO backing untouched
    finally:
        for run in runs.values():
            close_run(run)


def test_dirty_log_guest_sets_the_right_bits(model_hv):
    run = run_guest(model_hv, GUESTS["dirty_log"], setup=ro_slot, max_exits=5)
    try:
        bitmap = int.from_bytes(run.vm.get_dirty_log(2), "little")
        # pages 0, 1, 3, 63, 69; the read of page 68 is not dirty
        assert bitmap == (1 << 0) | (1 << 1) | (1 << 3) | (1 << 63) | (1 << 69)
        assert run.vm.get_dirty_log(2) == bytes(16)  # GET without manual protect clears
    finally:
        close_run(run)


def coalesced_guest(n_writes: int) -> str:
    """n_writes alternating 4-byte MMIO writes into the unbacked zone and the RO-slot zone, then OUTs."""
    body = []
    for i in range(n_writes):
        addr = ZONE_GPA + (i % 16) * 8 if i % 2 == 0 else RO_GPA + 0x1000 + (i % 4) * 4
        body.append(f"movl ${i}, {addr:#x}")
    body += ["mov $0x99, %al", "outb %al, $0x80", "outl %eax, $0x80", "outb %al, $0x84", "hlt"]
    return "\n".join(body)


def test_coalesced_ring_fills_then_exits_like_kvm(kvm_hv, model_hv):
    """169 writes fit (one entry stays free); the 170th and later exit; PIO zones coalesce OUTs."""
    source = coalesced_guest(KVM_COALESCED_MMIO_MAX + 2)
    runs = {}
    for label, hv in (("kvm", kvm_hv), ("model", model_hv)):
        runs[label] = run_guest(hv, source, setup=with_zones, drain=False, max_exits=20)
        runs[label].indices = runs[label].vcpu.ring_indices()
        runs[label].ring = runs[label].vcpu.drain_coalesced_mmio()
    try:
        kvm, model = runs["kvm"], runs["model"]
        assert model.exits == kvm.exits
        assert model.indices == kvm.indices == (0, KVM_COALESCED_MMIO_MAX - 1)
        assert model.ring == kvm.ring
        assert len(model.ring) == KVM_COALESCED_MMIO_MAX - 1
        # the writes past the full ring exit as MMIO writes; the OUTs all exit too (ring still full)
        assert [type(e) for e in model.exits] == [exits.MmioWrite] * 3 + [exits.IoOut] * 3 + [exits.Hlt]
    finally:
        for run in runs.values():
            close_run(run)


def test_coalesced_writes_drained_at_every_exit_match(kvm_hv, model_hv):
    source = coalesced_guest(40) + "\n mov 0x100000, %eax\n hlt"
    runs = {
        label: run_guest(hv, source, setup=with_zones) for label, hv in (("kvm", kvm_hv), ("model", model_hv))
    }
    try:
        assert runs["model"].exits == runs["kvm"].exits
        assert runs["model"].coalesced == runs["kvm"].coalesced
        pio = [w for w in runs["model"].coalesced if w.pio]
        assert [(w.addr, w.data) for w in pio] == [(0x80, b"\x99"), (0x80, b"\x99\x00\x00\x00")]
    finally:
        for run in runs.values():
            close_run(run)


def test_ram_size_is_enough():
    assert LOG_GPA + LOG_PAGES * 0x1000 > RAM_BYTES  # the logging slot lies above slot 0
