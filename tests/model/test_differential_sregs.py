"""KVM_GET_SREGS / KVM_SET_SREGS on a live vCPU, model vs kvm: the segment registers as the guest
has them (selector and hidden parts), in real mode, 32-bit protected mode (started there by the
VMM, or switching there itself with its own GDT) and 64-bit long mode.

Each guest loads segments of its own and exits on a port write; at each exit both backends must
report the same kvm_sregs, KVM_SET_SREGS of what KVM_GET_SREGS read must change nothing, and a
KVM_SET_SREGS with other segments must be what the guest runs with.

Named differences (this host's KVM is PVM), none of which is compared:
- an OUT exits with RIP past it on PVM (its emulator's writeback), on the OUT on the model, as
  upstream KVM's VMX / SVM leave it (complete_fast_pio_out);
- a far jump to a code descriptor whose accessed bit is clear: the CPU sets it (in the GDT and in
  CS.type), QEMU's helper_ljmp_protected does not (the model's CS.type reads 10 where KVM's reads
  11). The guests' descriptors here are marked accessed already, as Linux's GDT_ENTRY_INIT ones are.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from pcihole.hv import exits, x86_cpu_state
from pcihole.hv.model.cpu import UnsupportedCpuState
from pcihole.hv.uapi import kvm_sregs
from tests.guest_runner import LONG_MODE_PAGE_TABLES, RAM_BYTES, bare_vcpu, flat_vcpu
from tests.guestasm import assemble

GDT = 0x3000
DATA_BASE = 0x20000  # the base of the guest's own data segment (selector 0x20)


def descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """A GDT entry (SDM Vol. 3A 3.4.5): `limit` in units of the granularity `flags` say."""
    return struct.pack(
        "<HHBBBB",
        limit & 0xFFFF,
        base & 0xFFFF,
        (base >> 16) & 0xFF,
        access,
        (limit >> 16) & 0xF | flags << 4,
        base >> 24,
    )


# null, 0x08 32-bit code, 0x10 data, 0x18 64-bit code, 0x20 data based at DATA_BASE (64 KiB,
# byte granular), 0x28 16-bit data (real-mode-like): all accessed (see the module docstring).
GDT_BYTES = b"".join(
    (
        bytes(8),
        descriptor(0, 0xFFFFF, 0x9B, 0xC),
        descriptor(0, 0xFFFFF, 0x93, 0xC),
        descriptor(0, 0xFFFFF, 0x9B, 0xA),
        descriptor(DATA_BASE, 0xFFFF, 0x93, 0x0),
        descriptor(0, 0xFFFF, 0x93, 0x0),
    )
)
GDTR = f".word {len(GDT_BYTES) - 1}\n    .long {GDT}"

# Started in flat protected mode by the VMM (selectors 0x08 / 0x10 from x86_cpu_state): the guest
# loads its GDT, a CS by far jump, DS / SS, ES with a base, FS null, GS 16-bit; stores through ES.
STARTED_32 = f"""
    lgdtl gdtr
    ljmpl $0x8, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x20, %ax
    mov %ax, %es
    xor %ax, %ax
    mov %ax, %fs
    mov $0x28, %ax
    mov %ax, %gs
    out %al, $0x80
    movl $0x5a5a, %es:0x10
    in $0x71, %al
    movl %eax, %ds:0x14
    out %al, $0x81
    hlt
gdtr: {GDTR}
"""

# Real mode at 0:CODE_GPA: a real-mode segment, then its own GDT, CR0.PE and a far jump into
# 32-bit code.
SWITCHING_16 = f"""
    mov $0x123, %ax
    mov %ax, %ds
    movw $0x5a5a, 0x10
    out %al, $0x80
    movw $0x6b6b, 0x12
    xor %ax, %ax
    mov %ax, %ds
    lgdtl gdtr
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x8, $pm
gdtr: {GDTR}
.code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x20, %ax
    mov %ax, %es
    out %al, $0x81
    movl $0x5a5a, %es:0x10
    in $0x71, %al
    movl %eax, %ds:0x14
    out %al, $0x82
    hlt
"""

# Long mode (x86_cpu_state.enter_long_mode): its own GDT, CS by far return, data segments.
LONG_64 = f"""
    lgdt gdtr(%rip)
    pushq $0x18
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:  mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %ss
    mov $0x20, %eax
    mov %eax, %es
    xor %eax, %eax
    mov %eax, %fs
    out %al, $0x80
    in $0x71, %al
    movl %eax, 0x2014
    movl %eax, %fs:0x18
    out %al, $0x81
    hlt
gdtr: .word {len(GDT_BYTES) - 1}
    .quad {GDT}
"""

GUESTS = {"started-32": (STARTED_32, 32), "switching-16": (SWITCHING_16, 16), "long-64": (LONG_64, 64)}


SEGMENT_FIELDS = (
    "selector",
    "base",
    "limit",
    "type",
    "s",
    "dpl",
    "present",
    "db",
    "l",
    "g",
    "avl",
    "unusable",
)


def segments(sregs: kvm_sregs) -> dict:
    """What the comparison covers: every segment register field, the tables, CR0 / CR3 / CR4, EFER."""
    out: dict = {
        name: tuple(getattr(getattr(sregs, name), f) for f in SEGMENT_FIELDS)
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
    }
    out["gdt"] = (sregs.gdt.base, sregs.gdt.limit)
    out["idt"] = (sregs.idt.base, sregs.idt.limit)
    out["cr"] = (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)
    return out


def run(hv, guest: str, on_exit: Callable | None = None):
    """Run `guest` to HLT, answering each IN with 0x99..., calling `on_exit(vcpu, exit)` first: (the
    exits, kvm_sregs at each, final registers but RIP at exits, the guest's stores)."""
    source, bits = GUESTS[guest]
    with bare_vcpu(hv, source, bits=bits, data={GDT: GDT_BYTES}, cpuid=bits == 64) as (vcpu, ram):
        seen, states = [], []
        for _ in range(8):
            exit_ = vcpu.run()
            seen.append(exit_)
            if not isinstance(exit_, exits.IoOut | exits.IoIn):
                break
            states.append(segments(vcpu.get_sregs()))
            if on_exit is not None:
                on_exit(vcpu, exit_)
            if isinstance(exit_, exits.IoIn):
                vcpu.complete_read(b"\x99" * exit_.size)
        regs = vcpu.get_regs()
        final = (regs.rax, regs.rip, segments(vcpu.get_sregs()))
        stores = tuple(ram.read(addr, size) for addr, size in STORES)
        return seen, states, final, stores


# Where the guests store: DS 0x123 + 0x10 and + 0x12 (real mode), ES + 0x10, DS + 0x14 (32-bit),
# 0x2014 and FS + 0x18 (64-bit); then the same at the bases `moved` gives.
MOVED_BASE = 0x40000
STORES = [
    (0x1230 + 0x10, 4),
    (DATA_BASE + 0x10, 4),
    (0x14, 4),
    (0x18, 4),
    (0x2014, 4),
    (MOVED_BASE + 0x10, 4),
    (MOVED_BASE + 0x14, 4),
    (MOVED_BASE + 0x18, 4),
]


def write_back(vcpu, _exit) -> None:
    vcpu.set_sregs(vcpu.get_sregs())


@pytest.mark.parametrize("guest", GUESTS)
def test_get_sregs_reports_the_guest_segments(kvm_hv, model_hv, guest):
    seen, states, final, stores = run(model_hv, guest)
    kvm_seen, kvm_states, kvm_final, kvm_stores = run(kvm_hv, guest)
    assert seen == kvm_seen and isinstance(seen[-1], exits.Hlt), (seen, kvm_seen)
    for i, (state, kvm_state) in enumerate(zip(states, kvm_states, strict=True)):
        for key in state:
            assert state[key] == kvm_state[key], (i, key, state[key], kvm_state[key])
    assert final[0] == kvm_final[0] and final[2] == kvm_final[2]
    assert stores == kvm_stores
    # what the guest loaded, as the SDM says (not only what both agree on)
    last = states[-1]
    if guest == "long-64":
        assert last["cs"][:1] + last["cs"][7:9] == (0x18, 0, 1)  # selector, db, l
    else:
        assert last["cs"][:2] + last["cs"][7:8] == (0x08, 0, 1)  # selector, base, db
    assert last["es"][:3] == (0x20, DATA_BASE, 0xFFFF)
    assert last["gdt"] == (GDT, len(GDT_BYTES) - 1)
    if guest == "switching-16":
        assert states[0]["ds"][:2] == (0x123, 0x1230) and states[0]["cr"][0] & 1 == 0
        assert stores[0][:2] == b"\x5a\x5a"
    if guest != "long-64":
        assert stores[1] == b"\x5a\x5a\0\0"  # through ES's base


@pytest.mark.parametrize("guest", GUESTS)
def test_set_sregs_of_get_sregs_in_an_exit_changes_nothing(model_hv, guest):
    """KVM_SET_SREGS of what KVM_GET_SREGS read, in every exit (an OUT, an IN with its data under
    way): the same run as without."""
    assert run(model_hv, guest, write_back) == run(model_hv, guest)


@pytest.mark.parametrize("guest", GUESTS)
def test_set_sregs_of_get_sregs_in_an_exit_changes_nothing_on_kvm_either(kvm_hv, guest):
    assert run(kvm_hv, guest, write_back) == run(kvm_hv, guest)


def moved(vcpu, exit_) -> None:
    """In the first exit the VMM gives ES (DS in real mode) another base, in the IN's exit DS (FS
    in long mode) another: KVM loads the hidden parts as given, whatever the selector says."""
    sregs = vcpu.get_sregs()
    if isinstance(exit_, exits.IoIn):
        seg = sregs.fs if sregs.cs.l else sregs.ds
    elif exit_.port == 0x80:
        seg = sregs.es if sregs.cr0 & 1 else sregs.ds
    else:
        return
    seg.base = MOVED_BASE
    vcpu.set_sregs(sregs)


@pytest.mark.parametrize("guest", GUESTS)
def test_set_sregs_with_other_segments_in_an_exit_is_honoured(kvm_hv, model_hv, guest):
    """The guest goes on with the segments the VMM set in an exit (the IN's data still arrives),
    as on KVM."""
    seen, states, final, stores = run(model_hv, guest, moved)
    kvm_seen, kvm_states, kvm_final, kvm_stores = run(kvm_hv, guest, moved)
    assert seen == kvm_seen and isinstance(seen[-1], exits.Hlt)
    assert states == kvm_states and final[0] == kvm_final[0] and final[2] == kvm_final[2]
    assert stores == kvm_stores
    at = dict(zip(STORES, stores, strict=True))
    if guest == "long-64":
        assert at[(MOVED_BASE + 0x18, 4)][:1] == b"\x99"  # FS + 0x18, after the IN
    else:
        assert at[(MOVED_BASE + 0x14, 4)][:1] == b"\x99"  # DS + 0x14, after the IN
        if guest == "switching-16":
            assert at[(MOVED_BASE + 0x10, 4)][2:] == b"\x6b\x6b"  # DS + 0x12, in real mode
        else:
            assert at[(MOVED_BASE + 0x10, 4)][:2] == b"\x5a\x5a"  # ES + 0x10


# An MMIO read (RAM ends at RAM_BYTES), stored through ES: in the read's exit the VMM moves ES.
MMIO_GUEST = f"""
    lgdtl gdtr
    mov $0x20, %ax
    mov %ax, %es
    mov {RAM_BYTES:#x}, %ecx
    movl %ecx, %es:0x10
    out %al, $0x80
    hlt
gdtr: {GDTR}
"""


def run_mmio(hv, move: bool):
    """MMIO_GUEST, its read answered 0x11223344; with `move`, ES based at MOVED_BASE from the read's
    exit on: (the exits, ES then, the stores at both bases)."""
    with bare_vcpu(hv, MMIO_GUEST, data={GDT: GDT_BYTES}) as (vcpu, ram):
        seen = [vcpu.run()]
        assert isinstance(seen[0], exits.MmioRead), seen
        if move:
            sregs = vcpu.get_sregs()
            sregs.es.base = MOVED_BASE
            vcpu.set_sregs(sregs)
        es = vcpu.get_sregs().es.base
        vcpu.complete_read((0x11223344).to_bytes(4, "little"))
        seen += [vcpu.run(), vcpu.run()]
        return seen, es, ram.read(DATA_BASE + 0x10, 4), ram.read(MOVED_BASE + 0x10, 4)


@pytest.mark.parametrize("move", [False, True], ids=["write-back", "moved"])
def test_set_sregs_in_an_mmio_exit(kvm_hv, model_hv, move):
    """During an MMIO read's exit: KVM completes the read and the guest stores it through the new
    ES; the model runs the instruction again under the new state, its read answered from the exit
    (one exit, as on KVM)."""
    model = run_mmio(model_hv, move)
    assert model == run_mmio(kvm_hv, move)
    seen, es, at_data, at_moved = model
    assert [type(e).__name__ for e in seen] == ["MmioRead", "IoOut", "Hlt"]
    assert es == (MOVED_BASE if move else DATA_BASE)
    assert (at_moved if move else at_data) == (0x11223344).to_bytes(4, "little")


# The same bytes in 32-bit and 64-bit code: MOV to EAX, OUT, ADD to EAX, OUT, HLT.
BOTH_MODES = """
    mov $0x2a, %eax
    out %al, $0x80
    add $0x10, %eax
    out %al, $0x81
    hlt
"""


def run_into_long_mode(hv):
    """BOTH_MODES from flat 32-bit protected mode, switched to long mode by the VMM in the first
    OUT's exit: (the exits, RAX, CS / EFER at the end)."""
    with bare_vcpu(hv, BOTH_MODES, cpuid=True) as (vcpu, ram):
        seen = [vcpu.run()]
        ram.write(LONG_MODE_PAGE_TABLES, x86_cpu_state.identity_page_tables(LONG_MODE_PAGE_TABLES))
        sregs = vcpu.get_sregs()
        sregs.cs.l, sregs.cs.db = 1, 0
        sregs.cr3, sregs.cr4 = LONG_MODE_PAGE_TABLES, x86_cpu_state.X86_CR4_PAE
        sregs.cr0 |= x86_cpu_state.X86_CR0_PG
        sregs.efer = x86_cpu_state.EFER_LME | x86_cpu_state.EFER_LMA
        vcpu.set_sregs(sregs)
        seen += [vcpu.run(), vcpu.run()]
        sregs = vcpu.get_sregs()
        return seen, vcpu.get_regs().rax, (sregs.cs.l, sregs.cs.db, sregs.efer & x86_cpu_state.EFER_LMA)


def test_set_sregs_into_another_mode_in_an_exit(kvm_hv, model_hv):
    """KVM_SET_SREGS in an OUT's exit moves a 32-bit guest into long mode: it
    goes on after the OUT in 64-bit code (the model: in an engine of that mode)."""
    model = run_into_long_mode(model_hv)
    assert model == run_into_long_mode(kvm_hv)
    assert [type(e).__name__ for e in model[0]] == ["IoOut", "IoOut", "Hlt"]
    assert model[1] == 0x3A and model[2] == (1, 0, x86_cpu_state.EFER_LMA)


def test_states_the_model_cannot_run_are_refused_and_change_nothing(model_hv):
    """UnsupportedCpuState names the register, and the vCPU keeps the state it had."""
    with flat_vcpu(model_hv, "out %al, $0x80\nhlt") as vcpu:
        assert isinstance(vcpu.run(), exits.IoOut)  # in the OUT's exit, the HLT next
        before = segments(vcpu.get_sregs())
        for change, what in (
            (lambda s: setattr(s.cs, "base", 0x1000), "cs.base 0x1000 in protected mode"),
            (lambda s: setattr(s.cs, "db", 0), r"16-bit protected mode \(CS.DB = 0\)"),
            (lambda s: setattr(s, "cr0", s.cr0 & ~1), r"real mode with cs.base 0x0 != selector 0x8 << 4"),
            (lambda s: setattr(s, "cr0", s.cr0 | 1 << 31), "32-bit paging"),
        ):
            sregs = vcpu.get_sregs()
            change(sregs)
            with pytest.raises(UnsupportedCpuState, match=what):
                vcpu.set_sregs(sregs)
            assert segments(vcpu.get_sregs()) == before
        assert vcpu.run() == exits.Hlt()


HIGH = 0x30000  # above 64 KiB: out of a real-mode IP's reach
TO_HIGH_16 = f"""
    lgdtl gdtr
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x8, ${HIGH:#x}
gdtr: {GDTR}
"""
HIGH_32 = """
    mov $0x10, %ax
    mov %ax, %ds
    hlt
    out %al, $0x80
    hlt
"""


def run_to_high(hv):
    """A real-mode guest that enters protected mode itself, far into 32-bit code above 64 KiB, and
    halts there twice: (the exits, RIP and CS at each)."""
    data = {HIGH: assemble(HIGH_32, org=HIGH), GDT: GDT_BYTES}
    with bare_vcpu(hv, TO_HIGH_16, bits=16, data=data) as (vcpu, _ram):
        seen = []
        for _ in range(3):
            exit_ = vcpu.run()
            sregs = vcpu.get_sregs()
            seen.append((exit_, vcpu.get_regs().rip, sregs.cs.selector, sregs.cs.db))
        return seen


def test_a_guest_entering_protected_mode_itself_runs_on_after_an_exit(kvm_hv, model_hv):
    """The model's real-mode engine starts again at CS.selector * 16 + IP (16 bits): after the
    guest's far jump into 32-bit code above 64 KiB, an HLT exit must resume it there."""
    model = run_to_high(model_hv)
    kvm = run_to_high(kvm_hv)
    # RIP at the OUT's exit left out: PVM's is past it (module docstring)
    assert [s[:1] + s[2:] for s in model] == [s[:1] + s[2:] for s in kvm]
    assert [s[1] for s in model[::2]] == [s[1] for s in kvm[::2]]
    assert [e for e, *_ in model] == [exits.Hlt(), exits.IoOut(0x80, 1, b"\x10"), exits.Hlt()]
    assert model[0][1:] == (HIGH + 7, 0x08, 1)  # past the first HLT, in the 32-bit CS
