"""Exit dispatch: what pcihole does with each decoded exit (hv/exits.py).

Pure with respect to the vCPU: `ExitHandler.handle` takes an exit and returns the bytes a read
needs, `None` to run on, or a `Stop`. The run loop (run_loop.py) does the KVM side. Unit-tested with
made-up exits (tests/machine/test_dispatch.py).

Policy, as on a PC with nothing else attached (QEMU's unassigned_io_read returns all-ones):
- MMIO to a device on the MMIO bus (the ECAM host bridge) goes to it; anything else reads all-ones
  and drops writes, logged once per page.
- Port I/O to a device on the port bus (COM1, debug-exit) goes to it; any other port reads all-ones
  and drops writes, logged once per port. All-ones at 0xCF8-0xCFF also makes a guest's conf1 probe
  fail, so a Linux guest uses ECAM for everything (research/linux-ecam-boot.md §1.1).
- HLT ends the run: pcihole injects no interrupts, so a halted vCPU never wakes.
- A triple fault (KVM_EXIT_SHUTDOWN) ends the run and is reported as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pcihole.hv.exits import (
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unknown,
    VcpuExit,
)
from pcihole.machine.bus import Bus
from pcihole.machine.debug_exit import GuestExited
from pcihole.machine.stats import RunStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stop:
    """Why the run ended. `reason` is one of the STOP_* names below."""

    reason: str
    status: int | None = None
    detail: str = ""


STOP_DEBUG_EXIT = "debug-exit"
STOP_HALT = "halt"
STOP_TRIPLE_FAULT = "triple-fault"
STOP_INTERNAL_ERROR = "internal-error"
STOP_FAIL_ENTRY = "fail-entry"
STOP_SYSTEM_EVENT = "system-event"
STOP_UNKNOWN_EXIT = "unknown-exit"
STOP_TIMEOUT = "timeout"


class ExitHandler:
    def __init__(self, mmio: Bus, pio: Bus, stats: RunStats) -> None:
        self.mmio = mmio
        self.pio = pio
        self.stats = stats

    def handle(self, exit: VcpuExit) -> bytes | Stop | None:
        counts = self.stats.exits
        match exit:
            case MmioRead(addr, size):
                counts.mmio_read += 1
                device = self.mmio.find(addr, size)
                if device is None:
                    self._unclaimed_mmio(addr, "read")
                    return b"\xff" * size
                return device.read(addr, size)
            case MmioWrite(addr, data):
                counts.mmio_write += 1
                device = self.mmio.find(addr, len(data))
                if device is None:
                    self._unclaimed_mmio(addr, "write")
                    return None
                device.write(addr, data)
                return None
            case IoIn(port, size, count):
                counts.io += 1
                device = self.pio.find(port, size)
                if device is None:
                    self._unclaimed_port(port, "in")
                    return b"\xff" * (size * count)
                return b"".join(device.read(port, size) for _ in range(count))
            case IoOut(port, size, data, count):
                counts.io += 1
                device = self.pio.find(port, size)
                if device is None:
                    self._unclaimed_port(port, "out")
                    return None
                try:
                    for i in range(count):
                        device.write(port, data[i * size : (i + 1) * size])
                except GuestExited as e:
                    return Stop(STOP_DEBUG_EXIT, e.status)
                return None
            case Interrupted():
                return None
            case Hlt():
                counts.other += 1
                return Stop(STOP_HALT, detail="the guest halted (pcihole injects no interrupts)")
            case Shutdown():
                counts.other += 1
                return Stop(STOP_TRIPLE_FAULT, detail="the guest triple-faulted (KVM_EXIT_SHUTDOWN)")
            case InternalError(suberror, data):
                counts.other += 1
                words = ", ".join(f"{d:#x}" for d in data)
                return Stop(STOP_INTERNAL_ERROR, detail=f"KVM internal error, suberror {suberror}, data [{words}]")
            case FailEntry(reason, cpu):
                counts.other += 1
                return Stop(STOP_FAIL_ENTRY, detail=f"VM entry failed on cpu {cpu}: reason {reason:#x}")
            case SystemEvent(type_, data):
                counts.other += 1
                return Stop(STOP_SYSTEM_EVENT, detail=f"system event {type_}, data {list(data)}")
            case Unknown(reason):
                counts.other += 1
                return Stop(STOP_UNKNOWN_EXIT, detail=f"exit reason {reason}")
        raise TypeError(f"not a vCPU exit: {exit!r}")

    def _unclaimed_port(self, port: int, what: str) -> None:
        if port not in self.stats.unclaimed_ports:
            self.stats.unclaimed_ports.add(port)
            log.info("port %#x (%s) is claimed by no device: reads all-ones, writes dropped", port, what)

    def _unclaimed_mmio(self, addr: int, what: str) -> None:
        page = addr & ~0xFFF
        if page not in self.stats.unclaimed_mmio:
            self.stats.unclaimed_mmio.add(page)
            log.info("MMIO %s at %#x is claimed by no device: reads all-ones, writes dropped", what, addr)
