"""External interrupts (KVM_INTERRUPT, no in-kernel irqchip), HLT, IF and the STI shadow, and
SYSCALL / SYSRET: the same guest on the model and on /dev/kvm, the same result.

The guests are system_guest.py's; the VMM injects with vcpu.interrupt() at a chosen exit.
"""

from __future__ import annotations

import errno
import struct

import pytest

from pcihole.hv import exits
from pcihole.machine.host_quirks import host_is_pvm

from .system_guest import (
    HANDLER_BYTES,
    HANDLERS,
    RESULTS,
    USER_CS,
    USER_DS,
    USER_STACK,
    Handler,
    address_of,
    run_system_guest,
)

VECTOR = 0x30


def record(offset: int) -> str:
    """Handler: store RSP, the 5-quadword frame and RESULTS+0x40..0x58 (what the body stored) at RESULTS+offset."""
    lines = [f"    mov %rsp, {RESULTS + offset}"]
    for i in range(5):
        lines += [f"    mov {8 * i}(%rsp), %rax", f"    mov %rax, {RESULTS + offset + 8 + 8 * i}"]
    for i in range(3):
        lines += [
            f"    mov {RESULTS + 0x40 + 8 * i}, %rax",
            f"    mov %rax, {RESULTS + offset + 0x30 + 8 * i}",
        ]
    return "\n".join(lines) + "\n    hlt"


def inject_at_hlt(vectors=(VECTOR,)):
    """An on_exit that, at the first HLT exit, calls KVM_INTERRUPT with each of `vectors` and runs on."""

    def on_exit(vcpu, exit_, index):
        if isinstance(exit_, exits.Hlt) and not on_exit.done:
            on_exit.done = True
            for vector in vectors:
                vcpu.interrupt(vector)
            return True
        return False

    on_exit.done = False
    return on_exit


def inject_in_window(kind: type):
    """An on_exit that asks for the interrupt window at the first exit of `kind`, then injects
    VECTOR when the window opens (what QEMU does for its userspace PIC)."""

    def on_exit(vcpu, exit_, index):
        if isinstance(exit_, kind) and not on_exit.asked:
            on_exit.asked = True
            vcpu.request_interrupt_window(True)
        elif isinstance(exit_, exits.IrqWindowOpen):
            vcpu.request_interrupt_window(False)
            vcpu.interrupt(VECTOR)
            return True
        return False

    on_exit.asked = False
    return on_exit


GUESTS = {
    # HLT with IF set exits to the VMM; the interrupt injected then is taken after the HLT.
    "hlt_then_interrupt": ("mov $1, %ebx\n hlt\n mov $2, %ebx", lambda: inject_at_hlt()),
    # The second KVM_INTERRUPT before the entry replaces the first (kvm_queue_interrupt).
    "second_interrupt_replaces_first": ("hlt", lambda: inject_at_hlt((VECTOR + 1, VECTOR))),
}

# The interrupt window (request_interrupt_window -> IrqWindowOpen). This host's KVM (PVM) never
# exits for it, so the model is checked against the SDM (6.8.3: STI's shadow covers one more
# instruction; POPF has none), and against kvm where kvm reports the window at all.
WINDOW_GUESTS = {
    # With IF clear, the window opens after STI and one more instruction (the STI shadow).
    "window_opens_after_sti_shadow": (
        f"""
        cli
        out %al, $0x80
        movq $1, {RESULTS + 0x40}
        sti
        movq $2, {RESULTS + 0x48}
        movq $3, {RESULTS + 0x50}
        """,
        lambda: inject_in_window(exits.IoOut),
    ),
    # POPFQ setting IF opens the window right after it (no shadow).
    "window_opens_after_popf": (
        f"""
        cli
        out %al, $0x80
        pushq $0x202
        popfq
        movq $2, {RESULTS + 0x48}
        """,
        lambda: inject_in_window(exits.IoOut),
    ),
}


@pytest.mark.kvm
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_external_interrupt_matches_kvm(name, kvm_hv, model_hv):
    body, on_exit = GUESTS[name]
    handlers = [Handler(VECTOR, record(0)), Handler(VECTOR + 1, "hlt")]
    kvm = run_system_guest(kvm_hv, body, handlers, on_exit=on_exit(), rflags=0x202)
    model = run_system_guest(model_hv, body, handlers, on_exit=on_exit(), rflags=0x202)
    assert model.exits == kvm.exits
    assert model.regs == kvm.regs
    assert model.results == kvm.results
    assert struct.unpack_from("<Q", model.results, 8)[0] != 0  # the handler ran


PVM_NO_WINDOW = "this host's KVM (PVM) never exits with KVM_EXIT_IRQ_WINDOW_OPEN"


@pytest.mark.kvm
@pytest.mark.parametrize("name", sorted(WINDOW_GUESTS))
def test_interrupt_window_matches_kvm(name, kvm_hv, model_hv):
    body, on_exit = WINDOW_GUESTS[name]
    handlers = [Handler(VECTOR, record(0))]
    kvm = run_system_guest(kvm_hv, body, handlers, on_exit=on_exit(), rflags=0x202)
    if exits.IrqWindowOpen() not in kvm.exits:
        pytest.skip(PVM_NO_WINDOW)
    model = run_system_guest(model_hv, body, handlers, on_exit=on_exit(), rflags=0x202)
    assert (model.exits, model.regs, model.results) == (kvm.exits, kvm.regs, kvm.results)


def frame_and_seen(run) -> tuple[int, tuple[int, ...]]:
    """The RIP the interrupt frame holds, and RESULTS+0x40..0x50 as the handler saw them."""
    q = struct.unpack("<32Q", run.results)
    return q[1], q[6:9]


def test_interrupt_window_after_sti_shadow_sdm(model_hv):
    """SDM 6.8.3: after STI, interrupts stay blocked for one more instruction."""
    body, on_exit = WINDOW_GUESTS["window_opens_after_sti_shadow"]
    run = run_system_guest(model_hv, body, [Handler(VECTOR, record(0))], on_exit=on_exit(), rflags=0x202)
    assert run.exits[1:] == [exits.IrqWindowOpen(), exits.Hlt()]
    assert frame_and_seen(run) == (address_of(body, f"movq $3, {RESULTS + 0x50}"), (1, 2, 0))


def test_interrupt_window_after_popf_sdm(model_hv):
    """POPF that sets IF opens the window at the next instruction (no shadow)."""
    body, on_exit = WINDOW_GUESTS["window_opens_after_popf"]
    run = run_system_guest(model_hv, body, [Handler(VECTOR, record(0))], on_exit=on_exit(), rflags=0x202)
    assert run.exits[1:] == [exits.IrqWindowOpen(), exits.Hlt()]
    assert frame_and_seen(run) == (address_of(body, f"movq $2, {RESULTS + 0x48}"), (0, 0, 0))


def test_kvm_interrupt_vector_out_of_range(model_hv):
    """kvm_vcpu_ioctl_interrupt: EINVAL for irq >= KVM_NR_INTERRUPTS (256)."""
    vm = model_hv.create_vm()
    try:
        with pytest.raises(OSError) as bad:
            vm.create_vcpu(0).interrupt(256)
        assert bad.value.errno == errno.EINVAL
    finally:
        vm.close()


SYSCALL_SETUP = f"""
    mov $0xc0000080, %ecx
    rdmsr
    or $1, %eax
    wrmsr
    mov $0xc0000081, %ecx
    mov $0x00100008, %edx
    xor %eax, %eax
    wrmsr
    mov $0xc0000082, %ecx
    lea entry(%rip), %rax
    xor %edx, %edx
    wrmsr
    mov $0xc0000084, %ecx
    mov $0x200, %eax
    wrmsr
    lea user(%rip), %rcx
    mov $0x202, %r11d
    mov ${USER_STACK}, %rsp
    sysretq
entry:
    mov %rcx, {RESULTS}
    mov %r11, {RESULTS + 8}
    pushfq
    popq {RESULTS + 0x10}
    mov %cs, {RESULTS + 0x18}
    mov %ss, {RESULTS + 0x20}
    mov %rsp, {RESULTS + 0x28}
    hlt
user:
    mov %cs, %rbx
    mov %ss, %rdx
    syscall
"""


def _supported_cpuid(hv):
    """setup(vcpu): KVM_GET_SUPPORTED_CPUID for the guest, whose WRMSR of EFER.SCE / LME KVM
    checks against it (__kvm_valid_efer)."""
    return lambda vcpu: vcpu.set_cpuid2(hv.get_supported_cpuid())


def test_syscall_sysret_sdm(model_hv):
    """SDM Vol. 2B SYSRET then SYSCALL: CS/SS from STAR, RCX/R11 saved, RFLAGS masked by FMASK."""
    run = run_system_guest(model_hv, SYSCALL_SETUP, [], rflags=0x202, setup=_supported_cpuid(model_hv))
    rcx, r11, rflags, cs, ss, rsp = struct.unpack_from("<6Q", run.results)
    assert run.exits == [exits.Hlt()]
    assert (run.regs["rbx"], run.regs["rdx"]) == (USER_CS | 3, USER_DS | 3)  # after SYSRET
    assert (cs & 0xFFFF, ss & 0xFFFF) == (0x08, 0x10)
    assert r11 == 0x202 and rflags == 0x002  # IF masked by FMASK
    assert rsp == USER_STACK  # SYSCALL does not switch stacks
    assert rcx == run_syscall_return_address()  # the instruction after SYSCALL


PVM_SYSCALL = (
    "this host's KVM (PVM) cannot run it: WRMSR of EFER in kernel mode shuts the guest down, and "
    "a SYSCALL from user mode stays in user mode (PVM expects a PVM-aware guest)"
)


@pytest.mark.kvm
def test_syscall_sysret_matches_kvm(kvm_hv, model_hv):
    kvm = run_system_guest(kvm_hv, SYSCALL_SETUP, [], rflags=0x202, setup=_supported_cpuid(kvm_hv))
    # (With CPUID set, PVM's guest gets through the WRMSRs and SYSRETQ and shuts down on the
    # user-mode HLT its SYSCALL never left; without, on the WRMSR of EFER.)
    if kvm.exits[-1] == exits.Shutdown() and (host_is_pvm() or kvm.code_at_rip in (b"\x0f\x30", b"\x0f\x05")):
        pytest.skip(PVM_SYSCALL)
    model = run_system_guest(model_hv, SYSCALL_SETUP, [], rflags=0x202, setup=_supported_cpuid(model_hv))
    assert (model.exits, model.regs, model.results) == (kvm.exits, kvm.regs, kvm.results)


def run_syscall_return_address() -> int:
    """Where the guest's SYSCALL ends."""
    return address_of(SYSCALL_SETUP, "syscall") + 2


NMI_HANDLER = Handler(2, f"incq {RESULTS + 8}\n mov (%rsp), %rax\n mov %rax, {RESULTS}\n hlt\n iretq")


def nmi_at_each_hlt(count: int):
    """An on_exit that calls KVM_NMI at each of the first `count` HLT exits and runs on."""

    def on_exit(vcpu, exit_, index):
        if isinstance(exit_, exits.Hlt) and on_exit.left:
            on_exit.left -= 1
            vcpu.nmi()
            return True
        return False

    on_exit.left = count
    return on_exit


@pytest.mark.kvm
def test_nmi_matches_kvm(kvm_hv, model_hv):
    """KVM_NMI at an HLT exit: delivered through vector 2 although IF is clear."""
    body = "cli\n hlt\n out %al, $0x80"
    kvm, model = (
        run_system_guest(hv, body, [NMI_HANDLER], on_exit=nmi_at_each_hlt(1)) for hv in (kvm_hv, model_hv)
    )
    assert (model.exits, model.regs, model.results) == (kvm.exits, kvm.regs, kvm.results)
    assert struct.unpack_from("<QQ", model.results) == (address_of(body, "out %al, $0x80"), 1)


def test_nmi_blocked_until_iret_sdm(model_hv):
    """SDM 6.7.1: a second NMI while the handler of the first runs waits for its IRETQ and is
    taken at the next instruction boundary, the IRETQ's return address. (This host's KVM (PVM)
    takes it only at the next entry, after the guest's next exit.)"""
    body = "cli\n hlt\n out %al, $0x80"
    run = run_system_guest(model_hv, body, [NMI_HANDLER], on_exit=nmi_at_each_hlt(2))
    assert run.exits == [exits.Hlt(), exits.Hlt(), exits.Hlt()]  # no IoOut before the second NMI
    assert struct.unpack_from("<QQ", run.results) == (address_of(body, "out %al, $0x80"), 2)


@pytest.mark.kvm
def test_blocked_nmi_does_not_hold_back_kvm_interrupt(kvm_hv, model_hv):
    """inject_pending_event: an NMI that cannot be delivered (NMIs blocked until the running NMI
    handler's IRETQ) does not hold back the rest: KVM_INTERRUPT's vector, queued with a second
    KVM_NMI at an exit from inside the first NMI's handler, is taken right after that exit, inside
    the handler (it sees one NMI counted), not after the IRETQ and the second NMI."""
    body = "cli\n hlt\n out %al, $0x80"
    nmi = Handler(2, f"incq {RESULTS + 8}\n out %al, $0x81\n iretq")
    interrupt = Handler(VECTOR, f"mov {RESULTS + 8}, %rax\n mov %rax, {RESULTS + 16}\n hlt")

    def on_exit(vcpu, exit_, index):
        if isinstance(exit_, exits.Hlt) and not on_exit.nmis:
            on_exit.nmis = 1
            vcpu.nmi()
            return True
        if isinstance(exit_, exits.IoOut) and exit_.port == 0x81 and on_exit.nmis == 1:
            on_exit.nmis = 2
            vcpu.nmi()
            vcpu.interrupt(VECTOR)
        return False

    runs = []
    for hv in (kvm_hv, model_hv):
        on_exit.nmis = 0
        runs.append(run_system_guest(hv, body, [nmi, interrupt], on_exit=on_exit))
    kvm, model = runs
    assert (model.exits, model.results[:24]) == (kvm.exits, kvm.results[:24])
    assert [type(e).__name__ for e in model.exits] == ["Hlt", "IoOut", "Hlt"]
    assert struct.unpack_from("<QQ", model.results, 8) == (1, 1)  # one NMI, seen by the handler


# Handlers that count the order they run in: RESULTS+0 the count, then each handler's turn and the
# RIP its frame holds (the NMI's at +8 / +16, the interrupt's at +24 / +32).
ORDER_NMI = Handler(
    2,
    f"incq {RESULTS}\n mov {RESULTS}, %rax\n mov %rax, {RESULTS + 8}\n"
    f" mov (%rsp), %rax\n mov %rax, {RESULTS + 16}\n iretq",
)
ORDER_INTERRUPT = Handler(
    VECTOR,
    f"incq {RESULTS}\n mov {RESULTS}, %rax\n mov %rax, {RESULTS + 24}\n"
    f" mov (%rsp), %rax\n mov %rax, {RESULTS + 32}\n out %al, $0x81\n hlt",
)
INTERRUPT_HANDLER = HANDLERS + HANDLER_BYTES  # ORDER_INTERRUPT's slot
PVM_NMI_LATER = (
    "this host's KVM (PVM) has no NMI-window exit: the NMI waits for a later entry (after the "
    "interrupt handler's OUT, or one instruction into it)"
)


@pytest.mark.kvm
@pytest.mark.parametrize("ioctls", [("interrupt", "nmi"), ("nmi", "interrupt")], ids="-then-".join)
@pytest.mark.parametrize(
    ("body", "at"),
    [
        ("hlt\n out %al, $0x80", exits.Hlt),
        ("cli\n hlt\n out %al, $0x80", exits.Hlt),
        # an OUT's exit: both taken before the next instruction, the HLT in the same block
        ("out %al, $0x81\n out %al, $0x80", exits.IoOut),
    ],
    ids=["hlt", "cli-hlt", "out"],
)
def test_kvm_interrupt_is_taken_before_an_nmi_of_the_same_exit(kvm_hv, model_hv, ioctls, body, at):
    """KVM_INTERRUPT and KVM_NMI in the same exit: kvm_check_and_inject_events re-injects the
    interrupt KVM_INTERRUPT marked injected (kvm_queue_interrupt) before it looks at nmi_pending,
    whatever order the ioctls came in, and asks for the NMI window (enable_nmi_window), which
    opens right after the interrupt's delivery (VMX's NMI-window exit): the NMI comes at the
    interrupt handler's first instruction, and its handler runs first. On both, the interrupt's
    frame holds the RIP after the exit's instruction, and the NMI's a RIP inside the interrupt's
    handler."""

    def on_exit(vcpu, exit_, index):
        if isinstance(exit_, at) and not on_exit.done:
            on_exit.done = True
            for ioctl in ioctls:
                vcpu.nmi() if ioctl == "nmi" else vcpu.interrupt(VECTOR)
            return True
        return False

    runs = []
    for hv in (kvm_hv, model_hv):
        on_exit.done = False
        runs.append(run_system_guest(hv, body, [ORDER_NMI, ORDER_INTERRUPT], on_exit=on_exit, rflags=0x202))
    kvm, model = runs
    after_exit = address_of(body, "out %al, $0x80")
    # the NMI's handler ran first, from the interrupt handler's first instruction
    order = struct.unpack_from("<5Q", model.results)  # count, NMI's turn and RIP, interrupt's
    assert order == (2, 1, INTERRUPT_HANDLER, 2, after_exit)
    assert [type(e).__name__ for e in model.exits] == [at.__name__, "IoOut", "Hlt"]
    assert model.exits == kvm.exits
    kvm_count, _, kvm_nmi_rip, _, kvm_interrupt_rip = struct.unpack_from("<5Q", kvm.results)
    assert (kvm_count, kvm_interrupt_rip) == (2, after_exit)  # the interrupt first on kvm as well
    assert INTERRUPT_HANDLER <= kvm_nmi_rip < INTERRUPT_HANDLER + HANDLER_BYTES
    if host_is_pvm():
        assert kvm_nmi_rip != INTERRUPT_HANDLER, PVM_NMI_LATER  # (if PVM gains the window: compare)
    else:
        assert kvm.results[:40] == model.results[:40]


INS_LEFT_TO_THE_ENGINE = (
    "the model finishes only plain IN / OUT in the hook (finish_pio): after an INS / OUTS exit the "
    "rest of the translation block runs before the vector"
)


@pytest.mark.parametrize(
    "insn",
    [
        "in $0x71, %al",
        "in $0x71, %ax",
        "in %dx, %eax",
        "out %al, $0x71",
        pytest.param("insb", marks=pytest.mark.xfail(strict=True, reason=INS_LEFT_TO_THE_ENGINE)),
    ],
)
@pytest.mark.kvm
def test_interrupt_queued_in_a_pio_exit_comes_after_the_instruction(kvm_hv, model_hv, insn):
    """KVM_INTERRUPT in an IN / OUT exit: KVM finishes the instruction at the next entry
    (complete_fast_pio_in / complete_fast_pio_out, an IN's data into RAX) and injects the vector
    before the next instruction, which is in the same translation block on the model (the engine
    leaves the block after the instruction: finish_pio). The handler sees RAX and its frame's RIP
    as KVM leaves them; the MOV after the instruction runs only after the handler's IRETQ."""
    body = f"""
    movabs $0xaabbccddeeff0011, %rax
    mov $0x71, %dx
    mov ${RESULTS + 0x80}, %edi
    {insn}
    movq $1, {RESULTS + 0x40}
    out %al, $0x80
    """
    handler = Handler(
        VECTOR,
        f"mov %rax, {RESULTS}\n push %rax\n mov 8(%rsp), %rax\n mov %rax, {RESULTS + 8}\n"
        f" mov {RESULTS + 0x40}, %rax\n mov %rax, {RESULTS + 16}\n pop %rax\n iretq",
    )

    def on_exit(vcpu, exit_, index):
        if isinstance(exit_, exits.IoIn | exits.IoOut) and exit_.port == 0x71:
            vcpu.interrupt(VECTOR)
            if isinstance(exit_, exits.IoIn):
                vcpu.complete_read(b"\x99" * exit_.size * exit_.count)
            return True
        return False

    kvm, model = (
        run_system_guest(hv, body, [handler], on_exit=on_exit, rflags=0x202) for hv in (kvm_hv, model_hv)
    )
    assert (model.exits, model.regs, model.results) == (kvm.exits, kvm.regs, kvm.results)
    rax, frame_rip, seen = struct.unpack_from("<3Q", model.results)
    assert frame_rip == address_of(body, f"movq $1, {RESULTS + 0x40}") and seen == 0
    expected_rax = {
        "in $0x71, %al": 0xAABBCCDDEEFF0099,
        "in $0x71, %ax": 0xAABBCCDDEEFF9999,
        "in %dx, %eax": 0x99999999,
    }.get(insn, 0xAABBCCDDEEFF0011)
    assert rax == expected_rax
