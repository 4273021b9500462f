"""A long-mode system guest (system_guest.py) on a VM with the in-kernel irqchip, run the same way
on both backends: the LAPIC page (0xfee00000) and the IOAPIC (0xfec00000) are mapped uncached by
two 2 MiB pages, RSI holds the LAPIC's base and RDI the IOAPIC's for the body and its handlers.

The body talks to the host with `out %al, $0x81` (the host's `on_request(vm, vcpu, al)` acts:
raises a GSI, writes an MSR) and ends with `out %al, $0x80`. The run stops there, or fails after
a generous host time-out (a guest that never gets its interrupt would otherwise sleep in HLT
forever). Results are what the guest stores at RESULTS.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from pcihole.hv.uapi import KvmCap, cpuid2_with, kvm_cpuid_entry2
from pcihole.hv.x86_cpu_state import enter_long_mode
from tests.guestasm import assemble

from .system_guest import (
    CODE,
    GDT,
    IDT,
    PAGE_TABLES,
    RAM_BYTES,
    RESULTS,
    STACK,
    TSS,
    Handler,
    gdt,
    guest_source,
    idt,
    page_tables,
    tss,
)

LAPIC = 0xFEE00000
IOAPIC = 0xFEC00000
HIGH_PD = 0xE000  # the page directory of [3 GiB, 4 GiB), after system_guest's four table pages
LOG_ENTRIES = 14  # the order log's room: RESULTS + 0x88 .. + 0xf8 (results from 0x100)
DONE_PORT = 0x80
REQUEST_PORT = 0x81
#: Host seconds after which a run that has not finished is kicked and reported as stuck.
STUCK_AFTER = 60.0

# APIC registers (offsets from RSI)
EOI = 0xB0
SVR = 0xF0
TPR = 0x80
PPR = 0xA0
ISR = 0x100
IRR = 0x200
ICR = 0x300
ICR2 = 0x310
LVTT = 0x320
LVT0 = 0x350
TMICT = 0x380
TMCCT = 0x390
TDCR = 0x3E0

# The body's first lines: the bases in RSI / RDI, the APIC software-enabled (spurious vector 0xff).
ENABLE_APIC = f"""
    mov ${LAPIC}, %esi
    mov ${IOAPIC}, %edi
    movl $0x1ff, {SVR}(%rsi)
"""


#: The result slots (IrqchipRun.q) where tsc_deadline_handler counts the timer's interrupt: taken
#: at the HLT before it ran, or while the vCPU was halted in it (RESULTS + 0x108, + 0x110).
TSC_DEADLINE_AT_HLT = 0x21
TSC_DEADLINE_IN_HLT = 0x22


def tsc_deadline_then_halt(vector: int) -> str:
    """Guest code: the LAPIC timer in TSC-deadline mode on `vector`, its deadline RDTSC + 20,000,000
    (20 ms at 1 GHz, or less) written with WRMSR IA32_TSC_DEADLINE, then HLT until slot 0 counts
    an interrupt. Its handler is tsc_deadline_handler(vector), which makes the HLT race-free: the
    guest has IF set throughout (this host's KVM cannot emulate STI in kernel mode, so no STI; HLT
    pair), and an interrupt taken between the WRMSR and the HLT would otherwise leave the HLT to
    sleep for good. The deadline's distance then only makes the wake from HLT the likely path."""
    return f"""
    movl ${vector | 0x40000}, {LVTT}(%rsi)
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    add $20000000, %rax
    mov %rax, %rdx
    shr $32, %rdx
    mov $0x6e0, %ecx
    wrmsr
tsc_deadline_hlt:
    hlt
    cmpq $1, {RESULTS}
    jb tsc_deadline_hlt
"""


def tsc_deadline_handler(vector: int) -> Handler:
    """counting_handler(vector, 0) for tsc_deadline_then_halt: an interrupt taken at the HLT, before it
    ran, returns past it (the one-byte F4) and counts at TSC_DEADLINE_AT_HLT; one that woke the vCPU
    from it (RIP already past it, SDM: the saved RIP is the instruction after HLT) counts at
    TSC_DEADLINE_IN_HLT. An interrupt anywhere else, before the WRMSR armed the timer, counts at
    neither. 16(%rsp) is the RIP the CPU saved, above counting_handler's two pushes."""
    at_hlt = f"""
    lea tsc_deadline_hlt(%rip), %rbx
    cmp %rbx, 16(%rsp)
    jne 7f
    incq 16(%rsp)
    incq {RESULTS + 8 * TSC_DEADLINE_AT_HLT}
    jmp 8f
7:  inc %rbx
    cmp %rbx, 16(%rsp)
    jne 8f
    incq {RESULTS + 8 * TSC_DEADLINE_IN_HLT}
8:
"""
    return counting_handler(vector, 0, extra=at_hlt)


def counting_handler(vector: int, slot: int, *, eoi: bool = True, extra: str = "") -> Handler:
    """A handler that counts its vector in RESULTS + 8 * slot, logs it in the order log (RESULTS +
    0x80: a count at 0x80, the first LOG_ENTRIES vectors from 0x88: more would overwrite the GDT),
    runs `extra`, EOIs the LAPIC and returns."""
    return Handler(
        vector,
        f"""
    push %rax
    push %rbx
    incq {RESULTS + 8 * slot}
    mov {RESULTS + 0x80}, %rax
    cmp ${LOG_ENTRIES}, %rax
    jae 9f
    movq ${vector}, {RESULTS + 0x88}(,%rax,8)
9:  incq {RESULTS + 0x80}
    {extra}
    {f"movl $0, {EOI}(%rsi)" if eoi else ""}
    pop %rbx
    pop %rax
    iretq
""",
    )


def irqchip_page_tables() -> bytes:
    """system_guest's tables, plus PDPT[3] -> a directory mapping the IOAPIC and LAPIC 2 MiB pages
    (present, writable, PS, cache disabled)."""
    tables = bytearray(page_tables())
    struct.pack_into("<Q", tables, 0x1000 + 3 * 8, HIGH_PD | 3)  # PDPT entry 3
    return bytes(tables)


def high_directory() -> bytes:
    pd = bytearray(0x1000)
    for addr in (IOAPIC, LAPIC):
        index = (addr - 0xC0000000) >> 21
        struct.pack_into("<Q", pd, index * 8, (addr & ~0x1FFFFF) | 0x80 | 0x10 | 3)
    return bytes(pd)


def guest_cpuid(hv):
    """The CPUID table the machine gives a guest: KVM_GET_SUPPORTED_CPUID where the backend has it,
    else (the model) leaf 1 with x2APIC and the TSC-deadline timer, which is what the LAPIC reads."""
    if hv.check_extension(KvmCap.KVM_CAP_EXT_CPUID):
        return hv.get_supported_cpuid()
    table = cpuid2_with(1)()
    table.nent = 1
    table.entries[0] = kvm_cpuid_entry2(function=1, ecx=(1 << 21) | (1 << 24))
    return table


@dataclass
class IrqchipRun:
    exits: list = field(default_factory=list)
    results: bytes = b""
    stuck: bool = False

    def q(self, slot: int) -> int:
        """The 64-bit result at RESULTS + 8 * slot."""
        return struct.unpack_from("<Q", self.results, 8 * slot)[0]

    def log(self) -> list[int]:
        """The vectors the counting handlers took, in order."""
        n = min(self.q(0x10), LOG_ENTRIES)
        return [self.q(0x11 + i) for i in range(n)]

    def hlt_exits(self) -> int:
        return sum(isinstance(e, exits.Hlt) for e in self.exits)


def run_irqchip_guest(
    hv,
    body: str,
    handlers: list[Handler],
    *,
    pit: bool = False,
    on_request: Callable | None = None,
    on_io: Callable | None = None,
    max_exits: int = 10_000,
    setup: Callable | None = None,
    routing: list | None = None,
) -> IrqchipRun:
    """Run `body` on a new VM with the irqchip (with `routing` installed by KVM_SET_GSI_ROUTING
    right after it, as machine/builder.py does; KVM's default without) and the PIT, until
    `out %al, $0x80`."""
    vm = hv.create_vm()
    ram = HostMapping.anonymous(RAM_BYTES, name="guest ram")
    run = IrqchipRun()
    timer = None
    try:
        vm.create_irqchip()
        if routing is not None:
            vm.set_gsi_routing(routing)
        if pit:
            vm.create_pit2()
        ram.write(CODE, assemble(guest_source(ENABLE_APIC + body, handlers), bits=64, org=CODE))
        ram.write(GDT, gdt())
        ram.write(TSS, tss())
        ram.write(IDT, idt(handlers))
        vm.set_user_memory_region(0, 0, 0, RAM_BYTES, ram.addr)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(guest_cpuid(hv))
        enter_long_mode(vcpu, CODE, page_tables_gpa=PAGE_TABLES + 0x10000, write_guest=ram.write, rsp=STACK)
        ram.write(PAGE_TABLES, irqchip_page_tables())
        ram.write(HIGH_PD, high_directory())
        sregs = vcpu.get_sregs()
        sregs.cr3 = PAGE_TABLES
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rflags = 0x202  # IF from the start: this host's KVM cannot emulate STI in kernel mode
        vcpu.set_regs(regs)
        if setup is not None:
            setup(vm, vcpu)

        def stuck() -> None:
            run.stuck = True
            vcpu.kick()

        timer = threading.Timer(STUCK_AFTER, stuck)
        timer.daemon = True
        timer.start()
        for _ in range(max_exits):
            exit_ = vcpu.run()
            run.exits.append(exit_)
            if isinstance(exit_, exits.IoOut) and exit_.port == DONE_PORT:
                break
            if isinstance(exit_, exits.IoOut) and exit_.port == REQUEST_PORT:
                assert on_request is not None, "the guest asked for something and no one listens"
                on_request(vm, vcpu, exit_.data[0])
                continue
            if on_io is not None and isinstance(exit_, exits.IoOut | exits.IoIn):
                on_io(vm, vcpu, exit_)
                continue
            if isinstance(exit_, exits.IoIn):
                vcpu.complete_read(bytes(exit_.size * exit_.count))
                continue
            if isinstance(exit_, exits.Interrupted):
                if run.stuck:
                    break
                continue
            if isinstance(exit_, exits.Shutdown | exits.InternalError):
                break
        run.results = ram.read(RESULTS, 0x200)
    finally:
        if timer is not None:
            timer.cancel()
        vm.close()
        ram.close()
    return run
