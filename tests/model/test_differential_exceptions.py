"""Exceptions, interrupts and SYSCALL on the model and on /dev/kvm: the same guest, the same result.

Each guest (system_guest.py) loads its own GDT, IDT and TSS; its handlers store what the CPU
pushed (the frame, the error code, CR2, the stack it landed on, RFLAGS) into RESULTS. The test
compares the exits, the final registers and RESULTS between the two backends (SDM Vol. 3A ch. 6).
"""

from __future__ import annotations

import struct

import pytest

from pcihole.hv import exits

from .system_guest import (
    ABSENT_PAGE,
    READONLY_PAGE,
    RESULTS,
    RSP0,
    STACK,
    TRAP_GATE,
    USER_CS,
    USER_DS,
    USER_STACK,
    Handler,
    address_of,
    run_system_guest,
)

IF_FLAG, RF_FLAG = 1 << 9, 1 << 16


# A handler that stores the 5-quadword frame (and the error code when `error` is set), the stack
# pointer it started with and CR2 at RESULTS + offset, then halts.
def record(offset: int, *, error: bool = False) -> str:
    n = 6 if error else 5
    lines = [f"    mov %rsp, {RESULTS + offset}"]
    for i in range(n):
        lines += [f"    mov {8 * i}(%rsp), %rax", f"    mov %rax, {RESULTS + offset + 8 + 8 * i}"]
    lines += ["    mov %cr2, %rax", f"    mov %rax, {RESULTS + offset + 8 + 8 * n}", "    hlt"]
    return "\n".join(lines)


TO_RING3 = f"""
    pushq ${USER_DS | 3}
    pushq ${USER_STACK}
    pushq $0x202
    pushq ${USER_CS | 3}
    lea user(%rip), %rax
    pushq %rax
    iretq
user:
"""

GUESTS = {
    "divide_error": ("mov $7, %eax\n xor %ecx, %ecx\n div %ecx", [Handler(0, record(0))]),
    "invalid_opcode": ("mov $3, %ebx\n ud2", [Handler(6, record(0))]),
    "page_fault_not_present": (f"movl $1, {ABSENT_PAGE + 0x10}", [Handler(14, record(0, error=True))]),
    "page_fault_write_protect": (
        f"mov %cr0, %rax\n or $0x10000, %rax\n mov %rax, %cr0\n movl $1, {READONLY_PAGE + 8}",
        [Handler(14, record(0, error=True))],
    ),
    # INT n through a trap gate (IF kept) and through an interrupt gate (IF cleared), each returning
    # with IRETQ; the body stores what it got back.
    "int_trap_and_interrupt_gates": (
        f"""
        int $0x40
        int $0x41
        pushfq
        popq {RESULTS + 0x80}
        mov %rsp, {RESULTS + 0x88}
        """,
        [
            Handler(0x40, f"pushfq\n popq {RESULTS}\n mov %rsp, {RESULTS + 8}\n iretq", gate=TRAP_GATE),
            Handler(
                0x41,
                f"pushfq\n popq {RESULTS + 0x10}\n mov 16(%rsp), %rax\n mov %rax, {RESULTS + 0x18}\n iretq",
            ),
        ],
    ),
    # Ring 3 -> ring 0 through the TSS's RSP0 (INT 0x80, a DPL 3 gate) and its IST1 (a #PF).
    "ring3_int_through_tss": (TO_RING3 + "mov $0x1234, %ebx\n int $0x80", [Handler(0x80, record(0), dpl=3)]),
    "ring3_page_fault_on_ist": (
        TO_RING3 + f"movl $1, {READONLY_PAGE}",
        [Handler(14, record(0, error=True), ist=1)],
    ),
    "ring3_int_to_dpl0_gate_is_gp": (
        TO_RING3 + "int $0x81",
        [Handler(0x81, "hlt"), Handler(13, record(0, error=True))],
    ),
    # A #GP whose gate is not present: #NP while delivering it, two contributory faults make #DF.
    "double_fault": (
        "mov $0x1234, %ax\n mov %ax, %ds",
        [Handler(8, record(0, error=True), ist=1)],
    ),
    "page_fault_then_np_is_double_fault": (
        f"movl $1, {ABSENT_PAGE}",
        [Handler(8, record(0, error=True)), Handler(14, "hlt", present=False)],
    ),
    "triple_fault": ("xor %ecx, %ecx\n div %ecx", [Handler(3, "hlt")]),
    "no_idt_is_shutdown": ("lidt zero_idtr(%rip)\n ud2\nzero_idtr: .word 0\n .quad 0", []),
}


_INT_N = 0xCD
PVM_INT_N = (
    "this host's KVM (PVM) cannot run INT n: its kernel-mode emulator fails on it and from user "
    "mode it shuts the guest down (the model's result is checked against the SDM instead)"
)


def kvm_cannot_int_n(run) -> bool:
    last = run.exits[-1]
    return isinstance(last, exits.InternalError | exits.Shutdown) and run.code_at_rip[:1] == bytes([_INT_N])


def comparable(run) -> dict:
    """What both backends must agree on. After a shutdown the CPU state is not architectural (this
    host's KVM leaves RFLAGS.RF set), so RFLAGS is left out there."""
    regs = dict(run.regs)
    if run.exits[-1] == exits.Shutdown():
        del regs["rflags"]
    return {"exits": run.exits, "regs": regs, "results": run.results}


@pytest.mark.parametrize("name", sorted(GUESTS))
@pytest.mark.kvm
def test_exception_delivery_matches_kvm(name, kvm_hv, model_hv):
    body, handlers = GUESTS[name]
    kvm = run_system_guest(kvm_hv, body, handlers, rflags=0x202)
    model = run_system_guest(model_hv, body, handlers, rflags=0x202)
    if kvm_cannot_int_n(kvm):
        pytest.skip(PVM_INT_N)
    assert comparable(model) == comparable(kvm)
    assert model.exits[-1] in (exits.Hlt(), exits.Shutdown())


def quads(run) -> tuple[int, ...]:
    return struct.unpack("<32Q", run.results)


def test_int_n_through_trap_and_interrupt_gates_sdm(model_hv):
    """SDM 6.12.1.3: a trap gate leaves IF alone, an interrupt gate clears it; IRETQ restores it."""
    body, handlers = GUESTS["int_trap_and_interrupt_gates"]
    run = run_system_guest(model_hv, body, handlers, rflags=0x202)
    q = quads(run)
    assert run.exits == [exits.Hlt()]
    assert q[0] & IF_FLAG and not q[2] & IF_FLAG  # RFLAGS inside the trap / the interrupt handler
    assert q[3] & IF_FLAG  # the RFLAGS image the interrupt gate pushed
    assert q[16] & IF_FLAG and q[17] == STACK  # after both IRETQs
    assert q[1] == STACK - 5 * 8  # no privilege change: the frame on the current stack


def test_ring3_int_through_tss_sdm(model_hv):
    """SDM 6.12.1: INT n from ring 3 through a DPL 3 gate switches to the TSS's RSP0, pushes SS:RSP."""
    body, handlers = GUESTS["ring3_int_through_tss"]
    run = run_system_guest(model_hv, body, handlers, rflags=0x202)
    q = quads(run)
    user_int = run_int_address(body, 0x80)
    assert run.exits == [exits.Hlt()]
    assert q[0] == RSP0 - 5 * 8
    assert q[1:6] == (user_int + 2, USER_CS | 3, 0x202, USER_STACK, USER_DS | 3)
    assert run.regs["rflags"] & IF_FLAG == 0  # an interrupt gate


def test_ring3_int_to_dpl0_gate_is_gp_sdm(model_hv):
    """SDM 6.12.1.1: INT n to a gate of lower DPL than the CPL is #GP(vector * 8 + 2), a fault."""
    body, handlers = GUESTS["ring3_int_to_dpl0_gate_is_gp"]
    run = run_system_guest(model_hv, body, handlers, rflags=0x202)
    q = quads(run)
    user_int = run_int_address(body, 0x81)
    assert run.exits == [exits.Hlt()]
    assert q[0] == RSP0 - 6 * 8
    assert q[1:7] == (0x81 * 8 + 2, user_int, USER_CS | 3, 0x202 | RF_FLAG, USER_STACK, USER_DS | 3)


def run_int_address(body: str, vector: int) -> int:
    """Where the guest's `int $vector` is."""
    return address_of(body, f"int ${vector:#x}")
