"""The one way the tests run a guest on a VMM backend, at three levels, and the loop they share.

- `run_guest`: a raw VM of the hv interface (tests/model, tests/hv): flat 32-bit code at CODE_GPA in
  one RAM slot; every exit is recorded, MMIO reads and INs are answered with `read_answer(addr)`, so
  two backends get the same answers and can be compared exit by exit. `bare_vcpu` / `flat_vcpu`:
  the same VM in real, protected or long mode, for a test that handles each exit itself.
- `TableGuest`: a VM whose memory is laid out by pcihole.memory (RAM and a 256 MiB hole at ECAM,
  managed by GuestMemory with a strategy) running 64-bit code; `run_table` runs the table-driven
  access guest (tests/access_table_guest.py) and answers exits the way the machine does
  (`answer_mmio`).
- `pvh_kernel` / `machine`: a whole machine (pcihole.machine.build_machine) booting a tiny PVH kernel
  built on the fly, for tests of the machine and the CLI.

`run_vcpu` is the loop under the first two: KVM_RUN, drain the coalesced ring (as a VMM must at every
exit), hand the exit to the caller, until the caller says stop or `max_exits` is reached. The scan
guest's own harness, tests/guest/guest_unicorn.py, is not a VMM run: it executes the guest ELF on a
bare Unicorn with synthetic ACPI and ECAM, as an independent check of the scan algorithm.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pcihole.host.mman import HostMapping
from pcihole.hv import exits, x86_cpu_state
from pcihole.hv.uapi import kvm_regs
from pcihole.machine.builder import build_machine
from pcihole.machine.machinefile import MachineFile, loads
from pcihole.memory import GuestMemory, GuestRange, Hole, MemoryMap, Ram
from tests.access_table_guest import ENTRY, access_table_guest, pack_table, read_results
from tests.boot.elfimages import ELFCLASS32, PF_R, PF_W, PF_X, PT_LOAD, Part, build, phys32_note
from tests.guestasm import assemble

MiB = 1 << 20


@dataclass
class VcpuRun:
    """What one `run_vcpu` saw: every exit, every coalesced-ring entry drained, and whether the
    caller stopped it (False: `max_exits` ran out first)."""

    exits: list = field(default_factory=list)
    coalesced: list = field(default_factory=list)
    stopped: bool = False


def run_vcpu(
    vcpu,
    handle: Callable[[object], bool],
    *,
    max_exits: int,
    drain: bool = True,
    on_ring: Callable[[list], None] = lambda entries: None,
) -> VcpuRun:
    """Run `vcpu` exit after exit. After each exit the coalesced ring is drained (when `drain`) and
    given to `on_ring`, then the exit to `handle`, which answers it and returns False to stop."""
    out = VcpuRun()
    for _ in range(max_exits):
        exit_ = vcpu.run()
        if drain:
            entries = vcpu.drain_coalesced_mmio()
            out.coalesced.extend(entries)
            on_ring(entries)
        out.exits.append(exit_)
        if not handle(exit_):
            out.stopped = True
            break
    return out


# --- a raw VM: flat 32-bit code in one RAM slot -------------------------------------------------------

RAM_BYTES = 0x100000
CODE_GPA = 0x1000
STACK_TOP = 0x8000
RESULT_GPA = 0x2000  # guests store what they saw here


def read_answer(addr: int, size: int) -> bytes:
    """The VMM's answer to an MMIO read or IN: a recognisable function of the address."""
    return ((addr * 0x01010101 + 0x5A) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


@dataclass
class GuestRun:
    exits: list = field(default_factory=list)
    coalesced: list = field(default_factory=list)
    regs: object = None
    results: bytes = b""


def run_guest(
    hv,
    source: str,
    *,
    setup: Callable | None = None,
    max_exits: int = 400,
    stop_at_hlt: bool = True,
    drain: bool = True,
    result_bytes: int = 64,
) -> GuestRun:
    """Run `source` on a new VM of `hv` until HLT (when `stop_at_hlt`), a Shutdown or InternalError,
    or `max_exits`. `setup(vm)` adds slots before the vCPU is made; what it returns is kept alive in
    `run.keep`. The VM stays open (run.vm, run.vcpu, run.ram): close it with close_run()."""
    vm = hv.create_vm()
    ram = HostMapping.anonymous(RAM_BYTES, name="guest ram")
    try:
        ram.write(CODE_GPA, assemble(source, org=CODE_GPA))
        vm.set_user_memory_region(0, 0, 0, RAM_BYTES, ram.addr)
        keep = setup(vm) if setup else None
        vcpu = vm.create_vcpu(0)
        x86_cpu_state.enter_protected_mode_flat(vcpu, CODE_GPA, esp=STACK_TOP)

        def handle(exit_) -> bool:
            match exit_:
                case exits.MmioRead(addr, size):
                    vcpu.complete_read(read_answer(addr, size))
                case exits.IoIn(port, size):
                    vcpu.complete_read(read_answer(port, size))
                case exits.Hlt() if stop_at_hlt:
                    return False
                case exits.Shutdown() | exits.InternalError():
                    return False
            return True

        ran = run_vcpu(vcpu, handle, max_exits=max_exits, drain=drain)
        run = GuestRun(exits=ran.exits, coalesced=ran.coalesced)
        run.regs = vcpu.get_regs()
        run.results = ram.read(RESULT_GPA, result_bytes)
        run.vm = vm
        run.vcpu = vcpu
        run.ram = ram
        run.keep = keep
        return run
    except BaseException:
        vm.close()
        ram.close()
        raise


def close_run(run: GuestRun) -> None:
    run.vm.close()
    run.ram.close()


#: Where `bare_vcpu` puts a 64-bit guest's identity map (x86_cpu_state.enter_long_mode), in RAM.
LONG_MODE_PAGE_TABLES = 0x80000


@contextmanager
def bare_vcpu(
    hv, source: str, *, bits: int = 32, data: Mapping[int, bytes] | None = None, cpuid: bool = False
) -> Iterator[tuple[Any, HostMapping]]:
    """A vCPU of a new VM of `hv`, for a test that handles each exit itself: RAM_BYTES of RAM at 0 in
    one slot, `source` assembled for `bits` at CODE_GPA and `data` written at its addresses; with
    `cpuid`, KVM_SET_CPUID2 of what the backend supports. The vCPU starts at CODE_GPA, its stack at
    STACK_TOP, in real mode (`bits` 16, CS 0), flat protected mode (32) or long mode (64: the low
    4 GiB identity-mapped at LONG_MODE_PAGE_TABLES). Yields the vCPU and the RAM; closes both."""
    vm = hv.create_vm()
    ram = HostMapping.anonymous(RAM_BYTES, name="guest ram")
    try:
        ram.write(CODE_GPA, assemble(source, bits=bits, org=CODE_GPA))
        for gpa, blob in (data or {}).items():
            ram.write(gpa, blob)
        vm.set_user_memory_region(0, 0, 0, RAM_BYTES, ram.addr)
        vcpu = vm.create_vcpu(0)
        if cpuid:
            vcpu.set_cpuid2(hv.get_supported_cpuid())
        if bits == 64:
            x86_cpu_state.enter_long_mode(
                vcpu, CODE_GPA, page_tables_gpa=LONG_MODE_PAGE_TABLES, write_guest=ram.write, rsp=STACK_TOP
            )
        elif bits == 32:
            x86_cpu_state.enter_protected_mode_flat(vcpu, CODE_GPA, esp=STACK_TOP)
        else:  # real mode, as reset leaves it, at 0:CODE_GPA
            sregs = vcpu.get_sregs()
            sregs.cs.selector = sregs.cs.base = 0
            vcpu.set_sregs(sregs)
            vcpu.set_regs(kvm_regs(rip=CODE_GPA, rsp=STACK_TOP, rflags=x86_cpu_state.X86_EFLAGS_FIXED))
        yield vcpu, ram
    finally:
        vm.close()
        ram.close()


@contextmanager
def flat_vcpu(hv, source: str, bits: int = 32) -> Iterator:
    """bare_vcpu's vCPU in flat protected mode (`bits` 64: long mode)."""
    with bare_vcpu(hv, source, bits=bits) as (vcpu, _ram):
        yield vcpu


# --- a VM laid out by pcihole.memory: RAM and a hole, 64-bit code --------------------------------------


def answer_mmio(view, vcpu, exit_) -> bool:
    """Answer an MmioRead / MmioWrite from `view` (a MapView); False if it is not in the map.

    The machine puts each ECAM window on its MMIO bus (machine/ecam_window.py), which asks the memory
    map's view (`view.read` / `view.write`) and completes the read with the answer; tests that run a
    guest on bare GuestMemory, with no machine, take the same path through here.
    """
    if isinstance(exit_, exits.MmioRead):
        data = view.read(exit_.addr, exit_.size)
        if data is None:
            return False
        vcpu.complete_read(data)
        return True
    if isinstance(exit_, exits.MmioWrite):
        return view.write(exit_.addr, exit_.data)
    return False


CODE = 0x1000
STACK = 0x8000
TABLE = 0x10000
PAGE_TABLES = 0x100000
RAM_SIZE = 2 * MiB
ECAM = 0xE0000000  # below 4 GiB: reachable with the identity map of x86_cpu_state.enter_long_mode
ECAM_SIZE = 256 * MiB

GUEST_SOURCE = access_table_guest(TABLE)


@dataclass
class RunResult:
    results: list[int]
    exits: Counter = field(default_factory=Counter)
    #: Every coalesced-ring entry drained during the run, in order.
    coalesced: list = field(default_factory=list)

    @property
    def mmio_reads(self) -> int:
        return self.exits["MmioRead"]

    @property
    def mmio_writes(self) -> int:
        return self.exits["MmioWrite"]


class TableGuest:
    """A VM with RAM at [0, 2 MiB), a 256 MiB hole at ECAM (unless `holes` says otherwise), and 64-bit
    guest code (by default the table-driven access guest)."""

    def __init__(self, hv, strategy: str, *, holes: list[Hole] | None = None, source: str = GUEST_SOURCE):
        self.hv = hv
        self.vm = hv.create_vm()
        self.mem = GuestMemory(hv, self.vm, strategy)
        self.ram = Ram(GuestRange.from_size(0, RAM_SIZE), "ram")
        holes = holes if holes is not None else [Hole(GuestRange.from_size(ECAM, ECAM_SIZE), "ecam")]
        self.mem.update(MemoryMap([self.ram, *holes]))
        self.code = assemble(source, bits=64, org=CODE)
        self.vcpu = self.vm.create_vcpu(0)

    def start(self) -> None:
        """Load the code and put the vCPU at its first instruction, in long mode."""
        self.mem.write_guest(CODE, self.code)
        x86_cpu_state.enter_long_mode(
            self.vcpu, CODE, page_tables_gpa=PAGE_TABLES, write_guest=self.mem.write_guest, rsp=STACK
        )

    def run_table(self, ops: list[tuple[int, int, int]], *, max_exits: int = 100_000) -> RunResult:
        """ops: (addr, op, value). Returns each entry's result and the exits by kind."""
        mem = self.mem
        mem.write_guest(TABLE, pack_table(ops))
        self.start()

        def on_ring(entries: list) -> None:
            leftover = mem.view.coalesced(entries)
            assert leftover == [], f"ring entries outside any hole zone: {leftover}"

        def handle(exit_) -> bool:
            if isinstance(exit_, exits.Hlt):
                return False
            if isinstance(exit_, exits.MmioRead | exits.MmioWrite):
                assert answer_mmio(mem.view, self.vcpu, exit_), f"{exit_} is in no region"
                return True
            raise AssertionError(f"unexpected exit {exit_} at rip={self.vcpu.get_regs().rip:#x}")

        ran = run_vcpu(self.vcpu, handle, max_exits=max_exits, on_ring=on_ring)
        if not ran.stopped:
            raise AssertionError("the guest did not finish")
        raw = mem.read_guest(TABLE + 8, len(ops) * ENTRY.size)
        return RunResult(
            read_results(raw, len(ops)), Counter(type(e).__name__ for e in ran.exits), ran.coalesced
        )

    def close(self) -> None:
        self.mem.close()
        self.vm.close()


# --- a whole machine booting a tiny PVH kernel ------------------------------------------------------

KERNEL_GPA = 0x100000


def pvh_kernel(code: bytes, *, bss: int = 0) -> bytes:
    """A PVH ELF whose one segment is `code` at 1 MiB (plus `bss` zero bytes), entered at its start."""
    load = Part(PT_LOAD, KERNEL_GPA, code, memsz=len(code) + bss, flags=PF_R | PF_W | PF_X, align=0x1000)
    return build([load, phys32_note(KERNEL_GPA)], elf_class=ELFCLASS32, entry=KERNEL_GPA).data


def pvh_kernel_from_asm(source: str, *, bits: int = 32) -> bytes:
    return pvh_kernel(assemble(source, bits=bits, org=KERNEL_GPA))


def machine(
    toml: str, backend: str, strategy: str, kernel: bytes, name: str = "test-kernel", run_loop: str = "auto"
):
    """build_machine for a machine given as TOML text (a kvm test carries the kvm mark)."""
    spec: MachineFile = loads(toml, f"<{name}.toml>")
    return build_machine(
        spec, backend=backend, strategy=strategy, kernel=kernel, kernel_name=name, run_loop=run_loop
    )
