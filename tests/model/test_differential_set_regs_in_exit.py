"""KVM_SET_REGS while the vCPU is in an I/O or MMIO exit, model vs kvm: the VMM reads the registers
in each exit, changes two of them and writes them back, RIP left as it read it.

KVM then finishes the exiting instruction (complete_fast_pio_in / complete_fast_pio_out skip it since
RIP is still at pio.linear_rip; complete_emulated_mmio finishes it in the emulator) and goes on: the
model must not run it again. Compared: the exits in order, RIP in each exit (KVM_GET_REGS), and the
registers at the end (every `add $1, %ebx` after an exit ran once, on top of the VMM's value).

Named differences, none of which the guest below can see in the compared values:
- this host's KVM (PVM) runs IN / OUT through its emulator, not kvm_fast_pio: an OUT exits with RIP
  already past it (the emulator's writeback), where upstream KVM's VMX / SVM exit and the model
  leave RIP on the OUT; and an IN's data is dropped when the VMM sets registers during its exit
  (see the MMIO read below), where complete_fast_pio_in merges it into the VMM's RAX, as the model
  does;
- an MMIO read whose exit saw KVM_SET_REGS loses its result on KVM (x86_emulate_instruction's
  emulator_invalidate_register_cache clears the dirty bit the decoded destination had), the
  model writes it.
An MMIO write exits with RIP past the instruction on both (KVM's emulator finished it first; the
model, still in the middle of it, reports where it ends: instruction_length.py).
"""

from __future__ import annotations

import pytest

from pcihole.hv import exits
from pcihole.machine.host_quirks import host_is_pvm
from tests.guest_runner import CODE_GPA, flat_vcpu, read_answer
from tests.guestasm import assemble

pytestmark = pytest.mark.kvm

OUT_AT = CODE_GPA + 10  # after two 5-byte MOVs
GUEST = """
    mov $0x11, %ebx
    mov $0xaabbccdd, %eax
    out %al, $0x70
    add $1, %ebx
    in $0x71, %al
    add $1, %ebx
    mov 0x100000, %ecx
    add $1, %ebx
    movl $5, 0x100100
    add $1, %ebx
    mov $0x3f8, %dx
    mov $0x20, %esi
    insb
    add $1, %ebx
    hlt
"""
VMM_RBX = 0x100  # added to RBX in each exit
VMM_RDI = 0x5EED  # written to RDI in each exit
VMM_RAX = 0x12345678  # written to RAX in each exit


def run_setting_regs(hv):
    """Run GUEST, answering each exit after KVM_SET_REGS: (exit kinds, RIP and RAX in each, final
    registers)."""
    with flat_vcpu(hv, GUEST) as vcpu:
        kinds, rips, raxes = [], [], []
        for _ in range(12):
            exit_ = vcpu.run()
            regs = vcpu.get_regs()
            kinds.append(type(exit_).__name__)
            rips.append(regs.rip)
            raxes.append(regs.rax)
            if isinstance(exit_, exits.Hlt | exits.Shutdown | exits.InternalError):
                break
            regs.rbx += VMM_RBX
            regs.rdi = VMM_RDI
            regs.rax = VMM_RAX
            vcpu.set_regs(regs)
            if isinstance(exit_, exits.MmioRead):
                vcpu.complete_read(read_answer(exit_.addr, exit_.size))
            elif isinstance(exit_, exits.IoIn):
                vcpu.complete_read(read_answer(exit_.port, exit_.size))
        return kinds, rips, raxes, vcpu.get_regs()


def test_set_regs_in_exit_does_not_run_the_instruction_again(kvm_hv, model_hv):
    kvm_kinds, kvm_rips, kvm_raxes, kvm_regs = run_setting_regs(kvm_hv)
    kinds, rips, raxes, regs = run_setting_regs(model_hv)
    assert kinds == kvm_kinds == ["IoOut", "IoIn", "MmioRead", "MmioWrite", "IoIn", "Hlt"]
    # IN, MMIO read, MMIO write, INS and HLT: RIP at the same place on both (on the instruction
    # but for the MMIO write, past its 10-byte MOVL)
    for i in (1, 2, 3, 4, 5):
        assert rips[i] == kvm_rips[i], (kinds[i], hex(rips[i]), hex(kvm_rips[i]))
    assert rips[3] == rips[2] + 6 + 3 + 10  # past the MOV from MMIO, the ADD and the MOVL
    assert rips[0] == OUT_AT  # complete_fast_pio_out's linear_rip: the OUT itself
    assert kvm_rips[0] == (OUT_AT + 2 if host_is_pvm() else OUT_AT)
    assert (regs.rip, regs.rbx, regs.rdi) == (kvm_regs.rip, kvm_regs.rbx, kvm_regs.rdi)
    assert regs.rbx == 0x11 + 5 + 5 * VMM_RBX and regs.rdi == VMM_RDI + 1  # INSB moved EDI on
    # RAX at the exit after the IN: complete_fast_pio_in put the IN's byte into AL, over the
    # VMM's RAX; PVM's emulator dropped it
    with_in = VMM_RAX & ~0xFF | read_answer(0x71, 1)[0]
    assert raxes[2] == with_in
    assert kvm_raxes[2] == (VMM_RAX if host_is_pvm() else with_in)


MOVE_GUEST = """
    mov $0xaabbccdd, %eax
    in $0x71, %al
    nop
    nop
    nop
    mov $0x11, %ebx
    hlt
"""
IN_AT = CODE_GPA + 5


def run_moving_rip(hv):
    """At the IN's exit the VMM moves RIP past it and the NOPs (+5) and sets RAX, then completes
    the read: (RIP at the exit, the exit after, final RIP, RAX, RBX)."""
    with flat_vcpu(hv, MOVE_GUEST) as vcpu:
        first = vcpu.run()
        assert isinstance(first, exits.IoIn), first
        regs = vcpu.get_regs()
        at_exit = regs.rip
        regs.rip = IN_AT + 5
        regs.rax = VMM_RAX
        vcpu.set_regs(regs)
        vcpu.complete_read(b"\x99")
        second = vcpu.run()
        regs = vcpu.get_regs()
        return at_exit, second, regs.rip, regs.rax, regs.rbx


def test_rip_moved_in_an_in_exit_leaves_the_in_undone(kvm_hv, model_hv):
    """complete_fast_pio_in: RIP no longer at pio.linear_rip, so the IN is not completed: RAX keeps
    the VMM's value, and the guest goes on where the VMM put it."""
    model = run_moving_rip(model_hv)
    assert model == run_moving_rip(kvm_hv)
    assert model == (IN_AT, exits.Hlt(), IN_AT + 5 + 6, VMM_RAX, 0x11)


# The IN or OUT is followed by a path the guest takes only if the VMM's RIP is ignored (RBX 0x22)
# and one it takes at the VMM's RIP (RBX 0x11).
PIO_GUEST = """
    movabs $0xaabbccddeeff0011, %rax
    {insn}
    mov $0x22, %ebx
    hlt
moved:
    mov $0x11, %ebx
    hlt
"""
VMM_RAX_64 = 0x1122334455667788


def run_moving_rip_64(hv, insn: str):
    """A 64-bit guest's `insn` exits; the VMM sets RAX (all 64 bits) and RIP to `moved`, then
    completes an IN with 0x99 bytes: (exit kind, final RIP, RBX, RAX)."""
    source = PIO_GUEST.format(insn=insn)
    moved = CODE_GPA + len(assemble(source.split("moved:")[0], bits=64, org=CODE_GPA))
    with flat_vcpu(hv, source, bits=64) as vcpu:
        first = vcpu.run()
        regs = vcpu.get_regs()
        regs.rip, regs.rax = moved, VMM_RAX_64
        vcpu.set_regs(regs)
        if isinstance(first, exits.IoIn):
            vcpu.complete_read(b"\x99" * first.size)
        assert vcpu.run() == exits.Hlt()
        regs = vcpu.get_regs()
        return type(first).__name__, regs.rip, regs.rbx, regs.rax, moved


@pytest.mark.parametrize("insn", ["in $0x71, %eax", "in $0x71, %ax", "in $0x71, %al", "out %eax, $0x71"])
def test_rip_moved_in_a_pio_exit_is_taken_and_rax_kept(kvm_hv, model_hv, insn):
    """complete_fast_pio_in / complete_fast_pio_out: RIP no longer at pio.linear_rip, so the
    instruction is left undone (an IN's "zero extend" of a 4-byte read included: RAX keeps all
    64 bits the VMM set) and the guest goes on at the VMM's RIP, not after the rest of the
    instruction's translation block (the model's engine leaves the block after the hook:
    engine/patches/0005).

    This host's KVM (PVM) runs IN through its emulator (complete_emulated_pio), whose writeback
    puts RIP past the IN over the VMM's: its guest takes the other path there; RAX is the VMM's
    on both."""
    kind, rip, rbx, rax, moved = run_moving_rip_64(model_hv, insn)
    assert (rip, rbx, rax) == (moved + 6, 0x11, VMM_RAX_64)  # past `moved`'s MOV and HLT
    kvm_kind, kvm_rip, kvm_rbx, kvm_rax, _ = run_moving_rip_64(kvm_hv, insn)
    assert kind == kvm_kind and kvm_rax == rax
    if host_is_pvm() and kind == "IoIn":
        assert (kvm_rip, kvm_rbx) == (moved, 0x22)  # the HLT before `moved`, then RIP past it
    else:
        assert (kvm_rip, kvm_rbx) == (rip, rbx)


# MMIO writes as drivers make them, each followed by a marker the VMM can skip to: `add $1, %ebx`
# runs only where the guest goes on after the write.
WRITES_32 = [
    "movl $5, 0x100100",
    "mov %eax, 0x100104",
    "movw $7, (%edi)",
    "orb $1, 4(%edi)",
    "lock xadd %eax, (%edi)",
    "movnti %eax, 0x10(%edi)",
    "stosl",
]
WRITES_64 = [
    "movl $5, 0x100100",
    "movq %rax, (%rdi)",
    "movabs %eax, 0x100100",
    "lock orq $1, 8(%rdi)",
    "movnti %rax, 0x10(%rdi)",
    "movw $7, 0x20(%rdi)",
    "stosq",
]


def write_guest(writes: list[str]) -> str:
    body = "\n".join(f"{insn}\n    add $1, %ebx" for insn in writes)
    return f"""
    mov $0x100100, %edi
    xor %ebx, %ebx
    {body}
    hlt
"""


def run_writes(hv, writes: list[str], bits: int, skip: bool):
    """Run the writes, reading RIP in each MMIO write exit; with `skip`, the VMM moves RIP past
    the ADD that follows (3 bytes): (RIP in each exit, final RIP, RBX)."""
    rips = []
    with flat_vcpu(hv, write_guest(writes), bits=bits) as vcpu:
        for _ in range(4 * len(writes)):
            exit_ = vcpu.run()
            if isinstance(exit_, exits.Hlt):
                break
            if isinstance(exit_, exits.MmioRead):  # the read of a read-modify-write
                vcpu.complete_read(bytes(exit_.size))
                continue
            assert isinstance(exit_, exits.MmioWrite), exit_
            regs = vcpu.get_regs()
            rips.append(regs.rip)
            if skip:
                regs.rip += 3
                vcpu.set_regs(regs)
        regs = vcpu.get_regs()
        return rips, regs.rip, regs.rbx


@pytest.mark.parametrize(("writes", "bits"), [(WRITES_32, 32), (WRITES_64, 64)], ids=["32", "64"])
@pytest.mark.parametrize("skip", [False, True], ids=["resume", "skip"])
def test_mmio_write_exit_reports_rip_past_the_write(kvm_hv, model_hv, writes, bits, skip):
    """KVM finishes an instruction that writes MMIO before KVM_EXIT_MMIO (x86_emulate_instruction's
    writeback), so KVM_GET_REGS in the exit reads RIP past it (the ADD after it next); the guest
    resumes there, or where the VMM moved RIP from there (the ADD skipped: RBX stays 0)."""
    model = run_writes(model_hv, writes, bits, skip)
    assert model == run_writes(kvm_hv, writes, bits, skip)
    code = assemble(write_guest(writes), bits=bits, org=CODE_GPA)
    assert all(code[rip - CODE_GPA : rip - CODE_GPA + 3] == b"\x83\xc3\x01" for rip in model[0])
    assert len(model[0]) == len(writes) and model[2] == (0 if skip else len(writes))


STRING_STORES = {
    "rep stosl": "rep stosl",
    "std, rep movsw": "std\n    mov $0x2000, %esi\n    rep movsw",
    "stosb": "stosb",
}


@pytest.mark.parametrize("store", STRING_STORES)
@pytest.mark.parametrize("set_regs", [False, True], ids=["read", "read-set"])
def test_string_store_exits_as_the_emulator_left_it(kvm_hv, model_hv, store, set_regs):
    """A string store to MMIO exits once per iteration as KVM's emulator left it: RDI (and RSI)
    stepped by the element against DF, RCX one less under REP, and RIP on a REP instruction (moved
    past only at the entry that finds RCX 0) or past a plain one. The VMM writing back what it
    read changes nothing."""
    source = f"""
    mov $3, %ecx
    mov $0x100100, %edi
    {STRING_STORES[store]}
    hlt
"""

    def run(hv):
        with flat_vcpu(hv, source, bits=64) as vcpu:
            seen = []
            while isinstance(exit_ := vcpu.run(), exits.MmioWrite):
                regs = vcpu.get_regs()
                seen.append((exit_.addr, regs.rip, regs.rcx, regs.rdi, regs.rsi))
                if set_regs:
                    vcpu.set_regs(regs)
            regs = vcpu.get_regs()
            return seen, type(exit_).__name__, (regs.rip, regs.rcx, regs.rdi, regs.rsi)

    model = run(model_hv)
    assert model == run(kvm_hv)
    if store == "rep stosl":
        rep_at = CODE_GPA + 10
        steps = [(0x100100 + 4 * i, rep_at, 2 - i, 0x100104 + 4 * i, 0) for i in range(3)]
        assert model == (steps, "Hlt", (rep_at + 3, 0, 0x10010C, 0))
