"""Small guests on kvm against what a Linux guest needs from the machine: the in-kernel IOAPIC/LAPIC
receiving a GSI raised with KVM_IRQ_LINE, the LAPIC timer and the PIT, the 16550's THRE and RX
interrupts, ACPI power-off / reset, a triple fault, and the initrd handed over by the PVH modlist.

Each guest is 32-bit flat code at 1 MiB, entered through PVH by `build_machine` on the default machine:
it loads its own GDT and IDT, and ends by writing a value to the debug-exit port that says what it saw.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pcihole.boot.pvh import E820_RESERVED, HVM_MEMMAP_ENTRY, HVM_MODLIST_ENTRY, HVM_START_INFO
from pcihole.machine import layout
from pcihole.machine.builder import build_machine
from pcihole.machine.dispatch import StopReason
from pcihole.machine.host_quirks import host_is_pvm
from pcihole.machine.machinefile import load_default
from tests.guest_runner import KERNEL_GPA, pvh_kernel_from_asm

pytestmark = pytest.mark.kvm

LAPIC = 0xFEE00000
IOAPIC = 0xFEC00000

# The PVH entry is 32-bit; the guest moves to 64-bit long mode first, where Linux takes its
# interrupts too: a GDT (32-bit code 0x08, data 0x10,
# 64-bit code 0x18), page tables at 0x10000 identity-mapping 4 GiB with 2 MiB pages, then its IDT,
# a stack, the 8259s masked and the LAPIC software-enabled. EBX (hvm_start_info) is kept.
PROLOGUE = f"""
.code32
    lgdt gdtr
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x10000, %edi
    mov $6 * 1024, %ecx
    xor %eax, %eax
    rep stosl
    movl $0x11003, 0x10000
    movl $0x12003, 0x11000
    movl $0x13003, 0x11008
    movl $0x14003, 0x11010
    movl $0x15003, 0x11018
    mov $0x12000, %edi
    mov $0x83, %eax
2:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    cmp $0x16000, %edi
    jne 2b
    mov $0x10000, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                      # PAE
    mov %eax, %cr4
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax                     # EFER.LME
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    ljmp $0x18, $3f
.code64
3:  mov $0x90000, %rsp
    mov $0xff, %al                      # mask both 8259s, as firmware leaves them: GSIs 0-15 also
    outb %al, $0x21                     # reach the PIC, whose output is LINT0 (ExtINT)
    outb %al, $0xa1
    lidt idtr
    mov ${LAPIC + 0xF0:#x}, %edi
    movl $0x1ff, (%rdi)                 # SVR: APIC software enable, spurious vector 0xff
    mov ${LAPIC + 0x80:#x}, %edi
    movl $0, (%rdi)                     # TPR 0: accept every vector
"""

EPILOGUE = """
halt_forever:
    hlt
    jmp halt_forever
.balign 8
gdt: .quad 0, 0x00cf9a000000ffff, 0x00cf92000000ffff, 0x00af9a000000ffff
gdtr: .word 31
      .long gdt
.balign 16
idt: .fill 512, 8, 0
idtr: .word 256 * 16 - 1
      .quad idt
"""

EOI = f"""
    mov ${LAPIC + 0xB0:#x}, %edi
    movl $0, (%rdi)
"""


def set_gate(vector: int, handler: str) -> str:
    """A 64-bit interrupt gate for `vector` -> `handler` (selector 0x18, present, DPL 0)."""
    return f"""
    mov ${handler}, %eax
    mov %ax, idt + {vector * 16}
    movw $0x18, idt + {vector * 16 + 2}
    movw $0x8e00, idt + {vector * 16 + 4}
    shr $16, %eax
    mov %ax, idt + {vector * 16 + 6}
"""


def route_ioapic(pin: int, vector: int, *, level: bool = False, masked: bool = False) -> str:
    """IOAPIC redirection entry `pin` -> `vector`, fixed delivery to APIC id 0."""
    low = vector | (1 << 15 if level else 0) | (1 << 16 if masked else 0)
    return f"""
    mov ${IOAPIC:#x}, %edi
    movl ${0x10 + 2 * pin:#x}, (%rdi)
    movl ${low:#x}, 0x10(%rdi)
    movl ${0x11 + 2 * pin:#x}, (%rdi)
    movl $0, 0x10(%rdi)
"""


def guest(body: str) -> bytes:
    return pvh_kernel_from_asm(PROLOGUE + body + EPILOGUE, bits=64)


class Poke:
    """A device on port 0x80: a guest write to it calls `action` (the host's side of the test)."""

    PORT = 0x80

    def __init__(self, action) -> None:
        self.action = action
        self.calls = 0

    def read(self, addr: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, addr: int, data: bytes) -> None:
        self.calls += 1
        self.action()


def run(
    kernel: bytes,
    *,
    poke=None,
    initrd: bytes | None = None,
    host_quirks: str = "auto",
    timeout: float = 60,
    coalesce_console: bool = True,
):
    """Build the default machine with `kernel`, run it; the machine is closed, its memory kept readable
    through `low_memory` (the first 1 MiB) and `initrd_bytes`."""
    machine = build_machine(
        load_default(),
        backend="kvm",
        strategy="exit",
        kernel=kernel,
        kernel_name="platform-guest",
        initrd=initrd,
        host_quirks=host_quirks,
        coalesce_console=coalesce_console,
    )
    with machine:
        device = None
        if poke is not None:
            device = Poke(lambda: poke(machine))
            machine.pio.insert(device, Poke.PORT, 1, "test poke")
        result = machine.run(timeout=timeout)
        machine.low_memory = machine.memory.read_guest(0, 0x100000)  # type: ignore[attr-defined]
        if initrd is not None and machine.initrd_range is not None:
            start, size = machine.initrd_range
            machine.initrd_bytes = machine.memory.read_guest(start, size)  # type: ignore[attr-defined]
        return machine, result, device


def test_ioapic_delivers_a_gsi_raised_with_kvm_irq_line():
    # GSI 10 (no ISA device) as a level-triggered pin: the host raises it when the guest pokes 0x80,
    # and the guest's handler reports the vector it was entered through.
    kernel = guest(
        set_gate(0x4A, "on_irq")
        + route_ioapic(10, 0x4A, level=True)
        + """
    outb %al, $0x80
    sti
    jmp halt_forever
on_irq:
"""
        + EOI
        + """
    movl $0x4a, %eax
    outl %eax, $0xf4
"""
    )
    raised = []

    def poke(machine):
        machine.irq_lines.set_irq_line(10, True)
        raised.append(10)

    _, result, device = run(kernel, poke=poke)
    assert device.calls == 1 and raised == [10]
    assert result.stop.reason == StopReason.DEBUG_EXIT, result.stop
    assert result.stop.status == 0x4A


def test_no_interrupt_arrives_while_the_pin_is_masked():
    # The same guest with the redirection entry masked (bit 16): the GSI goes nowhere, the guest
    # stays halted until the timeout.
    kernel = guest(
        set_gate(0x4A, "on_irq")
        + route_ioapic(10, 0x4A, level=True, masked=True)
        + """
    outb %al, $0x80
    sti
    jmp halt_forever
on_irq:
    movl $0x4a, %eax
    outl %eax, $0xf4
"""
    )
    _, result, device = run(kernel, poke=lambda m: m.irq_lines.set_irq_line(10, True), timeout=3)
    assert device.calls == 1
    assert result.stop.reason == "timeout", result.stop


def test_lapic_timer_interrupt_arrives():
    kernel = guest(
        set_gate(0x41, "on_timer")
        + f"""
    mov ${LAPIC:#x}, %edi
    movl $0x41, 0x320(%rdi)             # LVT timer: one-shot, vector 0x41
    movl $0xb, 0x3e0(%rdi)              # divide by 1
    movl $0x10000, 0x380(%rdi)          # initial count
    sti
    jmp halt_forever
on_timer:
    movl $0x41, %eax
    outl %eax, $0xf4
"""
    )
    _, result, _ = run(kernel)
    assert result.stop.reason == StopReason.DEBUG_EXIT, result.stop
    assert result.stop.status == 0x41


def test_pit_interrupt_arrives_through_the_8259_and_lint0():
    # KVM_CREATE_PIT2's channel 0 drives ISA IRQ 0 into the in-kernel 8259, whose output reaches the
    # CPU through LINT0, which pcihole sets to ExtINT as firmware does (Firecracker's set_lint). The
    # guest programs the master PIC at vector base 0x50 with only IRQ 0 unmasked.
    kernel = guest(
        set_gate(0x50, "on_pit")
        + """
    movb $0x11, %al                     # ICW1: edge, cascade, ICW4 follows
    outb %al, $0x20
    movb $0x50, %al                     # ICW2: vector base 0x50
    outb %al, $0x21
    movb $0x04, %al                     # ICW3: slave on IRQ 2
    outb %al, $0x21
    movb $0x01, %al                     # ICW4: 8086 mode
    outb %al, $0x21
    movb $0xfe, %al                     # OCW1: only IRQ 0
    outb %al, $0x21
    movb $0x34, %al                     # PIT channel 0, lobyte/hibyte, mode 2 (rate generator)
    outb %al, $0x43
    movb $0x00, %al
    outb %al, $0x40
    movb $0x10, %al                     # count 0x1000: ~3.4 ms
    outb %al, $0x40
    sti
    jmp halt_forever
on_pit:
    movl $0x50, %eax
    outl %eax, $0xf4
"""
    )
    _, result, _ = run(kernel)
    assert result.stop.reason == StopReason.DEBUG_EXIT, result.stop
    assert result.stop.status == 0x50
    # The PIT and the PIC are in the kernel: no port exit but the guest's report.
    assert set(result.stats.io_by_port) == {0xF4}


def test_uart_thre_interrupt_is_delivered_and_cleared_by_reading_iir():
    # IER.THRI with an empty THR interrupts at once; the handler reads IIR (THRI = 0x02), then IIR
    # again (no interrupt pending: 0x01), and reports both.
    kernel = guest(
        set_gate(0x44, "on_uart")
        + route_ioapic(4, 0x44)
        + """
    movb $0x02, %al
    movw $0x3f9, %dx
    outb %al, (%dx)                      # IER = THRI
    sti
    jmp halt_forever
on_uart:
    movw $0x3fa, %dx
    inb (%dx), %al
    movb %al, %bl
    inb (%dx), %al
    movb %al, %bh
    movzwl %bx, %eax
    or $0x440000, %eax
    outl %eax, $0xf4
"""
    )
    machine, result, _ = run(kernel)
    assert result.stop.reason == StopReason.DEBUG_EXIT, result.stop
    assert result.stop.status == 0x44_01_02  # vector 0x44, IIR THRI, then IIR no interrupt
    assert machine.serial.irq.raised == 1


MESSAGE = b"pcihole: THRE-driven output, 4 bytes per interrupt\n"
BYTES_PER_INTERRUPT = 4


def thre_driven_writer() -> bytes:
    """A guest that sends MESSAGE as Linux's serial8250 driver does with THRE interrupts: enabling
    IER.THRI interrupts at once; the handler reads IIR and, for THRI, writes up to 4 bytes to THR,
    each after reading LSR; when the message is done it clears IER, reads LSR and IIR and reports
    (interrupts taken, the AND of every LSR it read, the last LSR, the last IIR) on the debug-exit port.
    Between interrupts it sleeps in HLT, which the in-kernel LAPIC handles without an exit."""
    return guest(
        set_gate(0x44, "on_uart")
        + route_ioapic(4, 0x44)
        + f"""
    xor %esi, %esi                       # next byte of the message
    xor %r12d, %r12d                     # interrupts taken
    mov $0xff, %r13d                     # AND of every LSR read
    movb $0x02, %al
    movw $0x3f9, %dx
    outb %al, (%dx)                      # IER = THRI: THR is empty, so this interrupts at once
    sti
    jmp halt_forever
on_uart:
    inc %r12d
    movw $0x3fa, %dx
    inb (%dx), %al                       # IIR
    and $0x0f, %al
    cmp $0x02, %al                       # THRI?
    jne 3f
    mov ${BYTES_PER_INTERRUPT}, %ecx
1:  movw $0x3fd, %dx
    inb (%dx), %al                       # LSR: THRE must be set before each byte
    and %eax, %r13d
    movb message(%rsi), %al
    movw $0x3f8, %dx
    outb %al, (%dx)                      # THR
    inc %esi
    cmp ${len(MESSAGE)}, %esi
    je 2f
    dec %ecx
    jnz 1b
3:  {EOI}
    iretq
2:  xor %al, %al
    movw $0x3f9, %dx
    outb %al, (%dx)                      # IER = 0: no more THRE interrupts
    movw $0x3fd, %dx
    inb (%dx), %al                       # LSR
    movzbl %al, %ebx
    movw $0x3fa, %dx
    inb (%dx), %al                       # IIR: nothing pending
    movzbl %al, %eax
    shl $8, %ebx
    or %ebx, %eax
    mov %r13d, %ebx
    shl $16, %ebx
    or %ebx, %eax
    mov %r12d, %ebx
    shl $24, %ebx
    or %ebx, %eax
    outl %eax, $0xf4
message: .ascii "{MESSAGE.decode().replace(chr(10), chr(92) + "n")}"
"""
    )


def test_coalesced_thr_writes_leave_the_uart_exact():
    """COM1's THR in a coalesced PIO zone (the default) against every write exiting: the same output,
    the same LSR and IIR values read by the guest, the same interrupts taken by the guest and the
    same IRQ line transitions; only the THR writes stop exiting."""
    kernel = thre_driven_writer()
    seen = {}
    for coalesced in (False, True):
        machine, result, _ = run(kernel, coalesce_console=coalesced)
        assert result.stop.reason == StopReason.DEBUG_EXIT, (coalesced, result.stop)
        assert machine.console_coalesced == coalesced
        thr_exits = result.stats.io_by_port[0x3F8]
        thr_coalesced = result.stats.io_coalesced_by_port[0x3F8]
        assert (thr_exits, thr_coalesced) == ((0, len(MESSAGE)) if coalesced else (len(MESSAGE), 0))
        seen[coalesced] = (bytes(machine.serial.output), result.stop.status, machine.serial.irq.raised)
    output, status, raised = seen[False]
    assert output == MESSAGE
    interrupts, lsr_and, lsr, iir = status >> 24, status >> 16 & 0xFF, status >> 8 & 0xFF, status & 0xFF
    assert interrupts == -(-len(MESSAGE) // BYTES_PER_INTERRUPT)  # one per 4 bytes, the first from IER
    assert lsr_and & 0x60 == 0x60 and lsr == 0x60 and iir & 0x0F == 0x01  # THRE|TEMT always, no IRQ left
    assert seen[True] == seen[False]


def test_uart_rx_interrupt_on_input():
    kernel = guest(
        set_gate(0x44, "on_uart")
        + route_ioapic(4, 0x44)
        + """
    movb $0x01, %al
    movw $0x3f9, %dx
    outb %al, (%dx)                      # IER = RDI
    outb %al, $0x80                      # ask the host to send a byte
    sti
    jmp halt_forever
on_uart:
    movw $0x3fa, %dx
    inb (%dx), %al                       # IIR: RDI = 0x04
    movb %al, %bh
    movw $0x3f8, %dx
    inb (%dx), %al                       # RBR
    movb %al, %bl
    movw $0x3fd, %dx
    inb (%dx), %al                       # LSR: data ready is clear again
    and $0x01, %eax
    shl $16, %eax
    movw %bx, %ax
    or $0x44000000, %eax
    outl %eax, $0xf4
"""
    )
    _, result, device = run(kernel, poke=lambda m: m.serial.receive(b"Z"))
    assert device.calls == 1
    assert result.stop.reason == StopReason.DEBUG_EXIT, result.stop
    assert result.stop.status == 0x44_00_04_5A  # vector 0x44, LSR.DR 0, IIR RDI, byte 'Z'


POWER_OFF = """
    movw $0x600, %dx
    movb $0x80, %al                      # WAK_STS to SLEEP_STATUS first, as acpi_hw_extended_sleep()
    outb %al, (%dx)
    movb $0x34, %al                      # SLP_TYP 5 | SLP_EN to SLEEP_CONTROL
    outb %al, (%dx)
    movl $0xbad, %eax
    outl %eax, $0xf4
"""
RESET = """
    movw $0x600, %dx
    movb $0x01, %al                      # RESET_VALUE to RESET_REG
    outb %al, (%dx)
    movl $0xbad, %eax
    outl %eax, $0xf4
"""
TRIPLE_FAULT = """
    lidt empty_idtr
    xorl %ecx, %ecx
    divl %ecx                            # #DE with no IDT: #GP, #DF, shutdown
    movl $0xbad, %eax
    outl %eax, $0xf4
empty_idtr: .word 0
    .long 0
"""


@pytest.mark.parametrize(
    ("body", "reason"),
    [(POWER_OFF, StopReason.POWER_OFF), (RESET, StopReason.REBOOT), (TRIPLE_FAULT, StopReason.TRIPLE_FAULT)],
    ids=["power-off", "reset", "triple-fault"],
)
def test_power_off_reset_and_triple_fault_end_the_run(body, reason):
    _, result, _ = run(guest(body))
    assert result.stop.reason == reason, result.stop


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (POWER_OFF, 0, None),
        (RESET, 1, "reboot: the guest rebooted"),
        (TRIPLE_FAULT, 1, "triple-fault: the guest triple-faulted"),
    ],
    ids=["power-off", "reset", "triple-fault"],
)
def test_cli_exit_status_for_power_off_reset_and_triple_fault(tmp_path, body, status, message):
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(guest(body))
    p = subprocess.run(
        [sys.executable, "-m", "pcihole.cli", "run", "--backend", "kvm", "--kernel", str(kernel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == status, p.stderr
    if message is None:
        assert "error" not in p.stderr
    else:
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pcihole: error: ") and message in lines[0], p.stderr


def test_initrd_is_handed_over_through_the_pvh_modlist():
    # The guest follows hvm_start_info (EBX) -> modlist_paddr -> modlist[0], sums the module's bytes
    # and reports the sum; the host checks the placement and the E820 reservation.
    initrd = bytes((i * 7 + 3) & 0xFF for i in range(50_000))
    kernel = guest(
        """
    movl $0xdead0001, %eax
    cmpl $1, 12(%rbx)                    # nr_modules
    jne report
    mov 16(%rbx), %rsi                   # modlist_paddr
    mov 0(%rsi), %rdi                    # modlist[0].paddr
    mov 8(%rsi), %rcx                    # modlist[0].size
    xorl %eax, %eax
    xorl %edx, %edx
sum:
    movzbl (%rdi), %edx
    addl %edx, %eax
    inc %rdi
    loop sum
report:
    outl %eax, $0xf4
"""
    )
    machine, result, _ = run(kernel, initrd=initrd)
    assert result.stop.reason == StopReason.DEBUG_EXIT, result.stop
    assert result.stop.status == sum(initrd) & 0xFFFFFFFF

    def read(addr: int, size: int) -> bytes:
        return machine.low_memory[addr : addr + size]

    info = HVM_START_INFO.unpack(read(layout.START_INFO_GPA, HVM_START_INFO.size))
    assert info[3] == 1 and info[4] == layout.MODLIST_GPA
    paddr, size, _, _ = HVM_MODLIST_ENTRY.unpack(read(layout.MODLIST_GPA, HVM_MODLIST_ENTRY.size))
    assert size == len(initrd)
    assert paddr >= KERNEL_GPA + 0x1000 and paddr % layout.INITRD_ALIGN == 0  # above the kernel
    assert (paddr, size) == machine.initrd_range and machine.initrd_bytes == initrd
    memmap = [
        HVM_MEMMAP_ENTRY.unpack(read(info[7] + i * HVM_MEMMAP_ENTRY.size, HVM_MEMMAP_ENTRY.size))
        for i in range(info[8])
    ]
    covering = [e for e in memmap if e[0] <= paddr and paddr + size <= e[0] + e[1]]
    assert [e[2] for e in covering] == [E820_RESERVED]


@pytest.mark.skipif(not host_is_pvm(), reason="only a software KVM (PVM) fails to emulate int3")
@pytest.mark.parametrize("quirks", ["none", "pvm"])
def test_int3_internal_error_without_quirks_and_bp_injection_with_them(quirks):
    kernel = guest(
        set_gate(3, "on_bp")
        + """
    int3
    movl $0xbad, %eax
    outl %eax, $0xf4
on_bp:
    popq %rax                           # the return EIP: right after the int3
    outl %eax, $0xf4
"""
    )
    _, result, _ = run(kernel, host_quirks=quirks)
    if quirks == "none":
        assert result.stop.reason == StopReason.INTERNAL_ERROR, result.stop
        assert "emulation failure" in result.stop.detail and "instruction bytes cc" in result.stop.detail
        assert "RIP 0x" in result.stop.detail and "\n" not in result.stop.detail
    else:
        assert result.stop.reason == StopReason.DEBUG_EXIT, result.stop
        assert KERNEL_GPA < result.stop.status < KERNEL_GPA + 0x1000
        assert result.stats.quirk_fixups_by_kind["int3"] == 1


@pytest.mark.skipif(not host_is_pvm(), reason="only a software KVM (PVM) fails to emulate fwait")
@pytest.mark.parametrize("quirks", ["none", "pvm"])
def test_fwait_internal_error_without_quirks_and_stepped_over_with_them(quirks):
    kernel = guest(
        """
    fwait
    movl $0x77, %eax
    outl %eax, $0xf4
"""
    )
    _, result, _ = run(kernel, host_quirks=quirks)
    if quirks == "none":
        assert result.stop.reason == StopReason.INTERNAL_ERROR, result.stop
        assert "instruction bytes 9b" in result.stop.detail
    else:
        assert result.stop.reason == StopReason.DEBUG_EXIT and result.stop.status == 0x77, result.stop
        assert result.stats.quirk_fixups_by_kind["fwait"] == 1
