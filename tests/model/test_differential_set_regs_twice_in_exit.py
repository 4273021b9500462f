"""KVM_SET_REGS more than once in one I/O or MMIO exit, model vs kvm: KVM keeps only the last write
(kvm_arch_vcpu_ioctl_set_regs -> __set_regs writes vcpu->arch.regs, RIP included, each time) and
decides what to do with the exiting instruction at the next KVM_RUN from the RIP it then has
(complete_fast_pio_in / complete_fast_pio_out: kvm_is_linear_rip(vcpu, vcpu->arch.pio.linear_rip);
complete_emulated_mmio: the emulator's writeback). KVM_GET_REGS after KVM_SET_REGS in the same exit
reads back what was set (__get_regs reads vcpu->arch.regs).

The VMM sets RIP to a sequence of places in the exit: `moved` (a path that sets RBX 0x11), `elsewhere`
(RBX 0x33) or `back` (RIP as KVM_GET_REGS read it in the exit: the guest goes on after the
instruction, RBX 0x22).

Named differences, as in test_differential_set_regs_in_exit.py:
- this host's KVM (PVM) runs IN / OUT through its emulator: an OUT exits with RIP past it (`back` is
  that RIP on each backend), and an IN's writeback puts RIP past the IN over any RIP the VMM set
  (its guest goes on after the IN, RBX 0x22) and drops the IN's data (RAX as the VMM left it), where
  upstream KVM (complete_fast_pio_in) and the model take a moved RIP and merge the data into RAX
  where RIP is back;
- an MMIO read's writeback sets RIP past the instruction on both, whatever the VMM set, and on KVM
  loses the read's result after KVM_SET_REGS (the model writes it): RCX is not compared.
"""

from __future__ import annotations

import pytest

from pcihole.hv import exits
from pcihole.machine.host_quirks import host_is_pvm
from tests.guest_runner import CODE_GPA, flat_vcpu
from tests.guestasm import assemble

pytestmark = pytest.mark.kvm

GUEST = """
    mov $0xaabbccdd, %eax
    mov $0x100100, %edi
    xor %ecx, %ecx
    {insn}
    mov $0x22, %ebx
    hlt
moved:
    mov $0x11, %ebx
    hlt
elsewhere:
    mov $0x33, %ebx
    hlt
"""
INSNS = {
    "in": "in $0x71, %al",
    "out": "out %al, $0x71",
    "mmio-read": "mov 0x100000, %ecx",
    "mmio-write": "movl $5, 0x100100",
    "mmio-string-write": "stosl",
}
SEQUENCES = {
    "moved,back": ("moved", "back"),
    "moved,elsewhere": ("moved", "elsewhere"),
    "back,moved": ("back", "moved"),
    "moved,moved": ("moved", "moved"),
    "back": ("back",),
    "moved": ("moved",),
}
VMM_RSI = 0x5EED  # a register the VMM changes with each write, besides RIP


def labels(source: str) -> dict[str, int]:
    """The guest addresses of `moved` and `elsewhere`."""
    return {
        name: CODE_GPA + len(assemble(source.split(f"{name}:")[0], org=CODE_GPA))
        for name in ("moved", "elsewhere")
    }


def run_setting_rip(hv, insn: str, sequence: tuple[str, ...]):
    """At `insn`'s exit, KVM_SET_REGS once per place of `sequence`, each followed by KVM_GET_REGS:
    (exit kind, RIP and RSI read back after each set, was each as set, exit after, final RIP, RBX,
    RAX)."""
    source = GUEST.format(insn=INSNS[insn])
    places = labels(source)
    with flat_vcpu(hv, source) as vcpu:
        first = vcpu.run()
        back = vcpu.get_regs().rip
        read_back = []
        for i, place in enumerate(sequence):
            regs = vcpu.get_regs()
            regs.rip = back if place == "back" else places[place]
            regs.rsi = VMM_RSI + i
            vcpu.set_regs(regs)
            got = vcpu.get_regs()
            read_back.append((got.rip == regs.rip, got.rsi == regs.rsi, got.rbx == regs.rbx))
        if isinstance(first, exits.IoIn | exits.MmioRead):
            vcpu.complete_read(b"\x99" * first.size)
        second = vcpu.run()
        regs = vcpu.get_regs()
        return type(first).__name__, read_back, second, regs.rip, regs.rbx, regs.rax, regs.rsi


def expected_rbx(insn: str, last: str, pvm: bool) -> int:
    """RBX at the HLT: the path the last RIP set leads to, but where the instruction's writeback
    overwrites RIP (an MMIO read; an IN on PVM)."""
    if insn == "mmio-read" or (pvm and insn == "in"):
        return 0x22
    return {"back": 0x22, "moved": 0x11, "elsewhere": 0x33}[last]


@pytest.mark.parametrize("sequence", SEQUENCES)
@pytest.mark.parametrize("insn", INSNS)
def test_last_set_regs_in_an_exit_wins(kvm_hv, model_hv, insn, sequence):
    model = run_setting_rip(model_hv, insn, SEQUENCES[sequence])
    kvm = run_setting_rip(kvm_hv, insn, SEQUENCES[sequence])
    kind, read_back, second, _rip, rbx, rax, rsi = model
    last = SEQUENCES[sequence][-1]
    # KVM_GET_REGS after each KVM_SET_REGS reads back what was set, on both
    assert read_back == kvm[1] == [(True, True, True)] * len(SEQUENCES[sequence])
    assert (kind, second) == (kvm[0], kvm[2]) and second == exits.Hlt()
    assert rbx == expected_rbx(insn, last, pvm=False)
    assert kvm[4] == expected_rbx(insn, last, pvm=host_is_pvm())
    if not (host_is_pvm() and insn == "in"):
        assert model[3:5] == kvm[3:5]  # final RIP and RBX
    # the last RSI set, but for a string store the guest finished (RSI unused by STOSL)
    assert rsi == kvm[6] == VMM_RSI + len(SEQUENCES[sequence]) - 1
    if insn == "in":
        # the IN's byte merged into RAX where RIP is back on the IN, else RAX as the VMM left it
        merged = 0xAABBCC99 if last == "back" else 0xAABBCCDD
        assert rax & 0xFFFFFFFF == merged
        assert kvm[5] & 0xFFFFFFFF == (0xAABBCCDD if host_is_pvm() else merged)
    elif insn != "mmio-read":
        assert rax == kvm[5]
