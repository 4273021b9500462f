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
- HLT ends the run when KVM hands it to userspace, i.e. without an in-kernel irqchip (pcihole then
  injects no interrupts, so a halted vCPU never wakes). With KVM_CREATE_IRQCHIP the kernel handles
  HLT itself (__kvm_emulate_halt); the run loop then looks at a vCPU that has been quiet for a
  while (KVM_GET_MP_STATE) and ends the run the same way when it is halted with interrupts disabled
  (Machine._halted_for_good). A Linux guest ends by powering off (acpi_power.py).
- S5 written to the ACPI sleep register ends the run with success (power-off); a write of the reset
  value, a triple fault (KVM_EXIT_SHUTDOWN) or a KVM_SYSTEM_EVENT_RESET ends it as a reboot / triple
  fault, which a guest that cannot reboot reports as failure.
- A KVM internal error is handed to the host quirks first (machine/host_quirks.py) where they are on;
  otherwise it ends the run with one line quoting the suberror, the instruction bytes and RIP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
from pcihole.hv.uapi import KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN
from pcihole.machine.acpi_power import GuestPoweredOff, GuestReset
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
    POWER_OFF = "power-off"
    REBOOT = "reboot"
    TRIPLE_FAULT = "triple-fault"
    INTERNAL_ERROR = "internal-error"
    FAIL_ENTRY = "fail-entry"
    SYSTEM_EVENT = "system-event"
    UNKNOWN_EXIT = "unknown-exit"
    TIMEOUT = "timeout"
    #: A signal asked pcihole to stop (SIGINT, SIGTERM); the Stop's `status` is the signal number.
    SIGNAL = "signal"
    SERIAL_MATCH = "serial-match"


@dataclass(frozen=True)
class Stop:
    """Why the run ended, with the guest's status (debug-exit) or what happened."""

    reason: StopReason
    status: int | None = None
    detail: str = ""


#: Stops that mean the guest finished well.
SUCCESSFUL_STOPS = (StopReason.POWER_OFF, StopReason.HALT, StopReason.SERIAL_MATCH)

#: What a host-quirk handler returns for an internal error: False (not handled: stop), or True
#: (handled: run on). See machine/host_quirks.py.
InternalErrorHook = Callable[[InternalError], bool]


class ExitHandler:
    def __init__(
        self,
        mmio: Bus,
        pio: Bus,
        stats: RunStats,
        *,
        on_internal_error: InternalErrorHook | None = None,
        describe_internal_error: Callable[[InternalError], str] | None = None,
    ) -> None:
        self.mmio = mmio
        self.pio = pio
        self.stats = stats
        self.on_internal_error = on_internal_error
        self.describe_internal_error = describe_internal_error

    def handle(self, exit: VcpuExit) -> bytes | Stop | None:
        counts = self.stats.exits
        if type(exit) is MmioRead:
            # The exit a guest makes by the thousand (every config read with the `exit` strategy),
            # tested before the match: a class pattern costs about 0.2 us more per exit.
            addr, size = exit
            counts.mmio_read += 1
            device = self.mmio.find(addr, size)
            if device is None:
                self._unclaimed_mmio(addr, "read")
                return OPEN_BUS * size
            return device.read(addr, size)
        match exit:
            case MmioWrite(addr, data):
                counts.mmio_write += 1
                device = self.mmio.find(addr, len(data))
                if device is None:
                    self._unclaimed_mmio(addr, "write")
                    return None
                try:
                    device.write(addr, data)
                except (GuestPoweredOff, GuestReset) as e:
                    return _power_stop(e)
                return None
            case IoIn(port, size, count):
                counts.io += 1
                self.stats.io_by_port[port] += 1
                device = self.pio.find(port, size)
                if device is None:
                    self._unclaimed_port(port, "in")
                    return OPEN_BUS * (size * count)
                return b"".join(device.read(port, size) for _ in range(count))
            case IoOut(port, size, data, count):
                counts.io += 1
                self.stats.io_by_port[port] += 1
                device = self.pio.find(port, size)
                if device is None:
                    self._unclaimed_port(port, "out")
                    return None
                try:
                    for i in range(count):
                        device.write(port, data[i * size : (i + 1) * size])
                except GuestExited as e:
                    return Stop(StopReason.DEBUG_EXIT, e.status)
                except (GuestPoweredOff, GuestReset) as e:
                    return _power_stop(e)
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
                if self.on_internal_error is not None and self.on_internal_error(exit):
                    self.stats.quirk_fixups += 1
                    return None
                if self.describe_internal_error is not None:
                    return Stop(StopReason.INTERNAL_ERROR, detail=self.describe_internal_error(exit))
                words = ", ".join(f"{d:#x}" for d in data)
                return Stop(
                    StopReason.INTERNAL_ERROR,
                    detail=f"KVM internal error, suberror {suberror}, data [{words}]",
                )
            case FailEntry(reason, cpu):
                counts.other += 1
                return Stop(StopReason.FAIL_ENTRY, detail=f"VM entry failed on cpu {cpu}: reason {reason:#x}")
            case SystemEvent(type_, data):
                counts.other += 1
                if type_ == KVM_SYSTEM_EVENT_SHUTDOWN:
                    return Stop(StopReason.POWER_OFF, 0, "the guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN)")
                if type_ == KVM_SYSTEM_EVENT_RESET:
                    return Stop(
                        StopReason.REBOOT, detail="the guest asked for a reset (KVM_SYSTEM_EVENT_RESET)"
                    )
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


def _power_stop(e: GuestPoweredOff | GuestReset) -> Stop:
    if isinstance(e, GuestPoweredOff):
        return Stop(StopReason.POWER_OFF, 0, f"the guest powered off ({e})")
    return Stop(StopReason.REBOOT, detail=f"the guest rebooted ({e})")
