"""Run one small guest on a backend and record what it did, so two backends can be compared.

The guest is flat 32-bit code loaded at CODE_GPA in a RAM slot (slot 0, [0, RAM_BYTES)). Every exit
is recorded; MMIO reads and INs are answered with a value derived from the address, so both
backends get the same answers; the run ends at the first Shutdown / InternalError or after
`max_exits`, or at an HLT when stop_at_hlt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from guestasm import assemble
from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from pcihole.hv.x86_cpu_state import enter_protected_mode_flat

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
    vm = hv.create_vm()
    ram = HostMapping.anonymous(RAM_BYTES, name="guest ram")
    try:
        ram.write(CODE_GPA, assemble(source, org=CODE_GPA))
        vm.set_user_memory_region(0, 0, 0, RAM_BYTES, ram.addr)
        keep = setup(vm) if setup else None  # noqa: F841 - mappings the slots need stay alive
        vcpu = vm.create_vcpu(0)
        enter_protected_mode_flat(vcpu, CODE_GPA, esp=STACK_TOP)
        run = GuestRun()
        for _ in range(max_exits):
            exit_ = vcpu.run()
            if drain:
                run.coalesced.extend(vcpu.drain_coalesced_mmio())
            run.exits.append(exit_)
            match exit_:
                case exits.MmioRead(addr, size):
                    vcpu.complete_read(read_answer(addr, size))
                case exits.IoIn(port, size):
                    vcpu.complete_read(read_answer(port, size))
                case exits.Hlt() if stop_at_hlt:
                    break
                case exits.Shutdown() | exits.InternalError():
                    break
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
