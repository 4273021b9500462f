"""Ways a model vCPU can be stopped and closed, each run in a child process by test_model_lifetime.py
(`python -m tests.reliability.lifetime_scenarios SCENARIO STRATEGY` from the repository root): if Unicorn touched guest RAM after it was
freed, the child dies with SIGSEGV, which the test sees as return code -11.

Each scenario pauses the vCPU inside a Unicorn callback (an IN / OUT or MMIO exit, Unicorn's
translation block not finished: the next instruction stores to RAM), or keeps it running, and then
ends it one way or another. "memory first" closes guest memory (munmap) before the VM: the order
that crashed before, which the vCPU must now survive on its own (Machine.close no longer uses it).
"""

from __future__ import annotations

import sys
import threading

from pcihole.hv import exits
from pcihole.machine.builder import build_machine
from pcihole.machine.machinefile import load_default
from tests.guest_runner import pvh_kernel_from_asm

RAM_WORD = 0x200000  # in the default machine's 64 MiB of RAM
ABSENT_MMIO = 0xD0000000  # no slot, no device: every read exits
GUESTS = {
    "out": f"1: out %al, $0x80\nincl {RAM_WORD:#x}\njmp 1b",
    "in": f"1: in $0x80, %al\nincl {RAM_WORD:#x}\njmp 1b",
    "mmio": f"1: mov {ABSENT_MMIO:#x}, %eax\nincl {RAM_WORD:#x}\njmp 1b",
    # Unaligned: the MEM_READ hook takes it whole and exits from inside the access.
    "mmio-unaligned": f"1: mov {ABSENT_MMIO + 2:#x}, %eax\nincl {RAM_WORD:#x}\njmp 1b",
    "spin": "1: jmp 1b",
}


def build(guest: str, strategy: str):
    kernel = pvh_kernel_from_asm(GUESTS[guest])
    return build_machine(load_default(), backend="model", strategy=strategy, kernel=kernel, kernel_name=guest)


def close_memory_first(m) -> None:
    """The order Machine.close used before: guest RAM unmapped while the vCPU is still paused."""
    m.memory.close()
    m.vm.close()
    m.hv.close()


def paused(guest: str, strategy: str):
    m = build(guest, strategy)
    exit_ = m.vcpu.run()
    expected = {"out": exits.IoOut, "in": exits.IoIn}.get(guest, exits.MmioRead)
    assert isinstance(exit_, expected), exit_
    return m


def scenario(name: str, strategy: str) -> None:
    if name in ("close-paused-in-out", "close-paused-in-in", "close-paused-in-mmio"):
        close_memory_first(paused(name.rsplit("-", 1)[1], strategy))
    elif name == "machine-close-paused-in-out":
        paused("out", strategy).close()
    elif name == "machine-close-paused-in-unaligned-mmio":
        # An exit from inside the access cannot unmap under it: Machine.close's order covers it.
        paused("mmio-unaligned", strategy).close()
    elif name == "memory-first-close-paused-in-unaligned-mmio":
        close_memory_first(paused("mmio-unaligned", strategy))
    elif name == "kick-paused-then-close":
        m = paused("out", strategy)
        kicker = threading.Thread(target=m.vcpu.kick)
        kicker.start()
        kicker.join()
        close_memory_first(m)
    elif name == "kick-paused-then-run-then-close":
        m = paused("out", strategy)
        m.vcpu.kick()
        while not isinstance(m.vcpu.run(), exits.Interrupted):
            pass
        close_memory_first(m)
    elif name == "close-while-running-in-another-thread":
        m = build("spin", strategy)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                while True:
                    m.vcpu.run()
            except OSError as e:  # EBADF: the vCPU was closed under it
                errors.append(e)

        runner = threading.Thread(target=run)
        runner.start()
        while m.vcpu._engine_thread is None:  # wait until it emulates (model internals: test only)
            threading.Event().wait(0.01)
        m.vcpu.close()
        runner.join()
        assert errors and getattr(errors[0], "errno", None) == 9, errors  # EBADF
        close_memory_first(m)
    else:
        raise SystemExit(f"unknown scenario {name}")
    print("survived")


if __name__ == "__main__":
    scenario(sys.argv[1], sys.argv[2])
