"""Exit dispatch: what pcihole does with each decoded exit (hv/exits.py).

Pure with respect to the vCPU: `ExitHandler.handle` takes an exit and returns the bytes a read
needs, `None` to run on, or a `Stop`. The run loop (run_loop.py) does the KVM side. Unit-tested with
made-up exits (tests/machine/test_dispatch.py).

Policy, as on a PC with nothing else attached (QEMU's unassigned_io_read returns all-ones):
- MMIO to a device on the MMIO bus (the ECAM host bridge) goes to it; anything else reads all-ones
  and drops writes, logged once per page.
- Port I/O to a device on the port bus (COM1, debug-exit) goes to it; any other port reads all-ones
  and drops writes, logged once per port. All-ones at 0xCF8-0xCFF also makes a guest's conf1 probe
  fail, so a Linux guest uses ECAM for everything (docs/linux-ecam.md §1).
- HLT ends the run: pcihole injects no interrupts, so a halted vCPU never wakes.
- A triple fault (KVM_EXIT_SHUTDOWN) ends the run and is reported as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

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

#: What a read of an address or port no device claims returns, byte by byte: all-ones, as on a PC
#: bus with nothing to answer (QEMU's unassigned_io_read). Not a hole's fill: an ECAM window is
#: always claimed, by its EcamWindow, which answers with its segment's fill.
OPEN_BUS = b"\xff"


class StopReason(StrEnum):
    """Why a run ended; the value is what the CLI prints."""

    DEBUG_EXIT = "debug-exit"
    HALT = "halt"
    TRIPLE_FAULT = "triple-fault"
    INTERNAL_ERROR = "internal-error"
    FAIL_ENTRY = "fail-entry"
    SYSTEM_EVENT = "system-event"
    UNKNOWN_EXIT = "unknown-exit"
    TIMEOUT = "timeout"
    #: A signal asked pcihole to stop (SIGINT, SIGTERM); the Stop's `status` is the signal number.
    SIGNAL = "signal"


@dataclass(frozen=True)
class Stop:
    """Why the run ended, with the guest's status (debug-exit) or what happened."""

    reason: StopReason
    status: int | None = None
    detail: str = ""


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
                    return OPEN_BUS * size
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
                    return OPEN_BUS * (size * count)
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
                    return Stop(StopReason.DEBUG_EXIT, e.status)
                return None
            case Interrupted():
                return None
            case Hlt():
                counts.other += 1
                return Stop(StopReason.HALT, detail="the guest halted (pcihole injects no interrupts)")
            case Shutdown():
                counts.other += 1
                return Stop(StopReason.TRIPLE_FAULT, detail="the guest triple-faulted (KVM_EXIT_SHUTDOWN)")
            case InternalError(suberror, data):
                counts.other += 1
                words = ", ".join(f"{d:#x}" for d in data)
                return Stop(StopReason.INTERNAL_ERROR, detail=f"KVM internal error, suberror {suberror}, data [{words}]")
            case FailEntry(reason, cpu):
                counts.other += 1
                return Stop(StopReason.FAIL_ENTRY, detail=f"VM entry failed on cpu {cpu}: reason {reason:#x}")
            case SystemEvent(type_, data):
                counts.other += 1
                return Stop(StopReason.SYSTEM_EVENT, detail=f"system event {type_}, data {list(data)}")
            case Unknown(reason):
                counts.other += 1
                return Stop(StopReason.UNKNOWN_EXIT, detail=f"exit reason {reason}")
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
