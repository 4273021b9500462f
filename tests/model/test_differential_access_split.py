"""How one guest access becomes exits and ring entries: the model against /dev/kvm, access by access.

KVM (arch/x86/kvm/x86.c emulator_read_write) splits an access only at a page boundary; each piece is
read from / written to memory (RAM, or a READONLY slot for reads), or goes to the MMIO bus (vcpu_mmio_
read/write, in chunks of 8: coalesced zones, fill devices) and, if no device takes it, exits as one
KVM_EXIT_MMIO of at most 8 bytes. The bus sees every piece before the first exit. Unaligned accesses are
never widened and never delivered twice. 8-byte accesses come from MMX `movq` in these 32-bit guests.

Layout (guest_runner): RAM [0, 1 MiB); RO slot [RO_GPA, +RO_BYTES) over a byte pattern; unbacked above.
"""

from __future__ import annotations

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from pcihole.hv.uapi import KvmMemFlag
from tests.guest_runner import RAM_BYTES, close_run, run_guest

RO_GPA = 0x200000
RO_BYTES = 0x2000
RO_END = RO_GPA + RO_BYTES  # unbacked from here
ZONE = RO_GPA + 0x1000  # a coalesced zone over the RO slot's second page, and past its end
UNBACKED = 0x300000
QWORD = 0x3000  # RAM holding the 8-byte value the guests store with movq

REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rip")


def ro_slot(vm, *, zone: bool = False):
    ro = HostMapping.anonymous(RO_BYTES, name="ro")
    ro.write(0, bytes(range(256)) * (RO_BYTES // 256))
    vm.set_user_memory_region(1, KvmMemFlag.KVM_MEM_READONLY, RO_GPA, RO_BYTES, ro.addr)
    if zone:
        vm.register_coalesced_mmio(ZONE, 0x2000)  # [ZONE, RO_END + 0x1000): RO page and an unbacked page
    return ro


def with_zone(vm):
    return ro_slot(vm, zone=True)


QWORD_SETUP = f"""
    movl $0x44332211, {QWORD:#x}
    movl $0x88776655, {QWORD + 4:#x}
    movq {QWORD:#x}, %mm0
"""

# name -> (guest, setup, expected exits on KVM (checked on both backends), expected ring entries)
GUESTS = {
    "ro_unaligned_write": (
        f"movl $0xa1b2c3d4, {RO_GPA + 1:#x}\n movw $0x1234, {RO_GPA + 0x11:#x}\n hlt",
        ro_slot,
        [
            exits.MmioWrite(RO_GPA + 1, bytes.fromhex("d4c3b2a1")),
            exits.MmioWrite(RO_GPA + 0x11, bytes.fromhex("3412")),
        ],
    ),
    "ro_to_unbacked_write": (
        f"movl $0xa1b2c3d4, {RO_END - 2:#x}\n hlt",
        ro_slot,
        [exits.MmioWrite(RO_END - 2, bytes.fromhex("d4c3")), exits.MmioWrite(RO_END, bytes.fromhex("b2a1"))],
    ),
    "ram_to_unbacked_write": (
        f"movl $0xa1b2c3d4, {RAM_BYTES - 1:#x}\n movzbl {RAM_BYTES - 1:#x}, %eax\n mov %eax, 0x2000\n hlt",
        ro_slot,
        [exits.MmioWrite(RAM_BYTES, bytes.fromhex("c3b2a1"))],
    ),
    "unbacked_unaligned_write": (
        f"movl $0xa1b2c3d4, {UNBACKED + 3:#x}\n movw $0x5678, {UNBACKED + 0xFFF:#x}\n hlt",
        ro_slot,
        [
            exits.MmioWrite(UNBACKED + 3, bytes.fromhex("d4c3b2a1")),
            exits.MmioWrite(UNBACKED + 0xFFF, b"\x78"),
            exits.MmioWrite(UNBACKED + 0x1000, b"\x56"),
        ],
    ),
    "unbacked_unaligned_read": (
        f"""
        mov {UNBACKED + 1:#x}, %eax
        movzwl {UNBACKED + 0x13:#x}, %ebx
        mov {UNBACKED + 0xFFE:#x}, %ecx
        mov %eax, 0x2000
        mov %ebx, 0x2004
        mov %ecx, 0x2008
        hlt
        """,
        ro_slot,
        [
            exits.MmioRead(UNBACKED + 1, 4),
            exits.MmioRead(UNBACKED + 0x13, 2),
            exits.MmioRead(UNBACKED + 0xFFE, 2),
            exits.MmioRead(UNBACKED + 0x1000, 2),
        ],
    ),
    "ro_to_unbacked_read": (
        f"mov {RO_END - 1:#x}, %eax\n mov %eax, 0x2000\n hlt",
        ro_slot,
        [exits.MmioRead(RO_END, 3)],
    ),
    "ram_to_unbacked_read": (
        f"movl $0x11223344, {RAM_BYTES - 4:#x}\n mov {RAM_BYTES - 2:#x}, %eax\n mov %eax, 0x2000\n hlt",
        ro_slot,
        [exits.MmioRead(RAM_BYTES, 2)],
    ),
    "unbacked_to_ro_read": (
        f"movl {RO_GPA - 2:#x}, %eax\n mov %eax, 0x2000\n hlt",
        ro_slot,
        [exits.MmioRead(RO_GPA - 2, 2)],
    ),
    "qword_mmio": (
        QWORD_SETUP
        + f"""
        movq %mm0, {UNBACKED + 0x40:#x}
        movq %mm0, {UNBACKED + 0x53:#x}
        movq %mm0, {RO_GPA + 0x18:#x}
        movq {UNBACKED + 0x80:#x}, %mm1
        movq {UNBACKED + 0x9B:#x}, %mm2
        movq %mm1, 0x2000
        movq %mm2, 0x2008
        hlt
        """,
        ro_slot,
        [
            exits.MmioWrite(UNBACKED + 0x40, bytes.fromhex("1122334455667788")),
            exits.MmioWrite(UNBACKED + 0x53, bytes.fromhex("1122334455667788")),
            exits.MmioWrite(RO_GPA + 0x18, bytes.fromhex("1122334455667788")),
            exits.MmioRead(UNBACKED + 0x80, 8),
            exits.MmioRead(UNBACKED + 0x9B, 8),
        ],
    ),
    "qword_page_crossing": (
        QWORD_SETUP
        + f"""
        movq %mm0, {RO_END - 3:#x}
        movq {UNBACKED + 0xFFD:#x}, %mm1
        movq %mm1, 0x2000
        hlt
        """,
        ro_slot,
        [
            exits.MmioWrite(RO_END - 3, bytes.fromhex("112233")),
            exits.MmioWrite(RO_END, bytes.fromhex("4455667788")),
            exits.MmioRead(UNBACKED + 0xFFD, 3),
            exits.MmioRead(UNBACKED + 0x1000, 5),
        ],
    ),
}


def _run_both(kvm_hv, model_hv, source, setup):
    runs = {}
    for label, hv in (("kvm", kvm_hv), ("model", model_hv)):
        runs[label] = run_guest(hv, source + "\n", setup=setup, max_exits=40)
    return runs


@pytest.mark.kvm
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_access_becomes_the_same_exits_as_on_kvm(name, kvm_hv, model_hv):
    source, setup, expected = GUESTS[name]
    runs = _run_both(kvm_hv, model_hv, source, setup)
    try:
        kvm, model = runs["kvm"], runs["model"]
        assert kvm.exits[:-1] == expected, "the kernel's answer changed: update the expectation"
        assert isinstance(kvm.exits[-1], exits.Hlt)
        assert model.exits == kvm.exits
        assert model.coalesced == kvm.coalesced == []
        assert {r: getattr(model.regs, r) for r in REGS} == {r: getattr(kvm.regs, r) for r in REGS}
        assert model.results == kvm.results
        assert model.keep.read(0, RO_BYTES) == kvm.keep.read(0, RO_BYTES)
    finally:
        for run in runs.values():
            close_run(run)


ZONE_GUEST = (
    QWORD_SETUP
    + f"""
    movl $0xa1b2c3d4, {ZONE + 1:#x}
    movw $0x1234, {ZONE + 0x7:#x}
    movq %mm0, {ZONE + 0x10:#x}
    movq %mm0, {ZONE + 0x23:#x}
    movl $0x55667788, {RO_END - 2:#x}
    movq %mm0, {RO_END + 0xFFC:#x}
    mov {UNBACKED:#x}, %eax
    hlt
    """
)


@pytest.mark.kvm
def test_writes_into_a_coalesced_zone_make_the_same_ring_entries_as_on_kvm(kvm_hv, model_hv):
    """Unaligned and 8-byte writes over a RO slot and an unbacked page: one ring entry per piece; the
    piece of a straddling write that leaves the zone exits."""
    runs = _run_both(kvm_hv, model_hv, ZONE_GUEST, with_zone)
    try:
        kvm, model = runs["kvm"], runs["model"]
        ring = [(w.addr, w.data) for w in kvm.coalesced]
        q = bytes.fromhex("1122334455667788")
        assert ring == [
            (ZONE + 1, bytes.fromhex("d4c3b2a1")),
            (ZONE + 7, bytes.fromhex("3412")),
            (ZONE + 0x10, q),
            (ZONE + 0x23, q),
            (RO_END - 2, bytes.fromhex("8877")),
            (RO_END, bytes.fromhex("6655")),
            (RO_END + 0xFFC, q[:4]),
        ], "the kernel's answer changed: update the expectation"
        assert kvm.exits == [
            exits.MmioWrite(RO_END + 0x1000, q[4:]),
            exits.MmioRead(UNBACKED, 4),
            exits.Hlt(),
        ]
        assert model.exits == kvm.exits
        assert [(w.addr, w.data, w.pio) for w in model.coalesced] == [
            (w.addr, w.data, w.pio) for w in kvm.coalesced
        ]
    finally:
        for run in runs.values():
            close_run(run)
