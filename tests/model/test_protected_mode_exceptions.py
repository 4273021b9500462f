"""Exception delivery in 32-bit protected mode (SDM Vol. 3A 6.12): 8-byte gates, 32-bit frames,
SS0:ESP0 from the TSS on a privilege change; on the model and, where it can run it, on /dev/kvm."""

from __future__ import annotations

import struct

import pytest

from pcihole.hv import exits

from .system_guest import (
    RESULTS,
    RSP0,
    STACK,
    TRAP_GATE,
    USER_CS,
    USER_DS,
    USER_STACK,
    Handler,
    protected_address_of,
    run_protected_guest,
)


def record32(offset: int, words: int) -> str:
    """Handler: store ESP and the `words` dwords of the frame at RESULTS + offset, then halt."""
    lines = [f"    mov %esp, {RESULTS + offset}"]
    for i in range(words):
        lines += [f"    mov {4 * i}(%esp), %eax", f"    mov %eax, {RESULTS + offset + 4 + 4 * i}"]
    return "\n".join(lines) + "\n    hlt"


TO_RING3 = f"""
    pushl ${USER_DS | 3}
    pushl ${USER_STACK}
    pushl $0x202
    pushl ${USER_CS | 3}
    pushl $user
    iret
user:
"""

GUESTS = {
    "divide_error": ("mov $7, %eax\n xor %ecx, %ecx\n div %ecx", [Handler(0, record32(0, 3))]),
    "gp_with_selector_error_code": ("mov $0x1234, %ax\n mov %ax, %ds", [Handler(13, record32(0, 4))]),
    "invalid_opcode_through_trap_gate": ("ud2", [Handler(6, record32(0, 3), gate=TRAP_GATE)]),
    "double_fault": ("mov $0x1234, %ax\n mov %ax, %ds", [Handler(8, record32(0, 4))]),
    "triple_fault": ("xor %ecx, %ecx\n div %ecx", []),
}


@pytest.mark.kvm
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_protected_mode_exception_matches_kvm(name, kvm_hv, model_hv):
    body, handlers = GUESTS[name]
    kvm = run_protected_guest(kvm_hv, body, handlers)
    model = run_protected_guest(model_hv, body, handlers)
    kvm_regs, model_regs = dict(kvm.regs), dict(model.regs)
    if kvm.exits[-1] == exits.Shutdown():
        del kvm_regs["rflags"], model_regs["rflags"]  # not architectural after a shutdown
    assert (model.exits, model_regs, model.results) == (kvm.exits, kvm_regs, kvm.results)


def test_ring3_int_through_tss_protected_mode_sdm(model_hv):
    """INT n from ring 3: SS0:ESP0 from the 32-bit TSS, then SS, ESP, EFLAGS, CS, EIP pushed."""
    body = TO_RING3 + "int $0x80"
    run = run_protected_guest(model_hv, body, [Handler(0x80, record32(0, 5), dpl=3)])
    esp, *frame = struct.unpack_from("<6I", run.results)
    assert run.exits == [exits.Hlt()]
    assert esp == RSP0 - 5 * 4
    user_int = protected_address_of(body, "int $0x80")
    assert frame == [user_int + 2, USER_CS | 3, 0x202, USER_STACK, USER_DS | 3]


def test_int_n_same_privilege_protected_mode_sdm(model_hv):
    """INT n at CPL 0: no stack switch, EIP / CS / EFLAGS on the current stack, IF cleared by an
    interrupt gate and kept by a trap gate."""
    body = "sti\n int $0x40"
    run = run_protected_guest(model_hv, body, [Handler(0x40, "pushf\n popl 0x7010\n" + record32(0, 3))])
    esp, eip, cs, eflags = struct.unpack_from("<4I", run.results)
    (inside,) = struct.unpack_from("<I", run.results, 0x10)
    assert run.exits == [exits.Hlt()]
    assert (esp, eip, cs) == (STACK - 12, protected_address_of(body, "int $0x40") + 2, 0x08)
    assert eflags & 0x200 and not inside & 0x200
