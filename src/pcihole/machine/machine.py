"""A built machine: run its vCPU until the guest is done, then say what happened and what it cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pcihole.guest import REPORT_SYMBOL
from pcihole.guest.report import DeviceArea, ReportError, ScanReport, read_report, read_scan_tsc
from pcihole.host.tsc import TscUnknown, tsc_clock
from pcihole.hv.uapi import KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE
from pcihole.machine.dispatch import ExitHandler, Stop, StopReason
from pcihole.machine.host_quirks import NO_QUIRKS, HostQuirks, InternalErrorHandler
from pcihole.machine.run_loop import run_until_stop
from pcihole.machine.stop_request import StopRequest

X86_EFLAGS_IF = 1 << 9
#: With the console's THR writes coalesced, how long such a write may wait in the ring when the guest
#: makes no exit after it (it spins, or sleeps in the in-kernel HLT until its THRE interrupt).
CONSOLE_FLUSH_SECONDS = 0.02

if TYPE_CHECKING:
    from pcihole.boot.elf import ElfImage
    from pcihole.hv.interface import Hypervisor, InterruptLines, Vcpu, Vm
    from pcihole.hv.kvm.c_run_loop import FillPages
    from pcihole.machine.bus import Bus
    from pcihole.machine.ecam_window import HotplugWiring
    from pcihole.machine.machinefile import MachineFile
    from pcihole.machine.serial import SerialConsole
    from pcihole.machine.stats import RunStats
    from pcihole.memory import GuestMemory, MemoryStats
    from pcihole.pci.host_bridge import HostBridge


@dataclass
class RunResult:
    backend: str
    backend_reason: str
    strategy: str
    stop: Stop
    #: Wall time of the whole run on the host, from the first KVM_RUN to the guest's exit.
    seconds: float
    stats: RunStats
    memory: MemoryStats
    serial: str
    #: The scan guest's report, read from guest memory (None for a kernel without one).
    report: ScanReport | None
    #: The functions the machine has (what a correct guest finds).
    machine_devices: list = field(default_factory=list)
    #: The scan alone, timed by the guest's TSC (`pcihole_timing`), where the guest reports it.
    guest_scan_seconds: float | None = None

    @property
    def scan_seconds(self) -> float:
        """The guest's own scan time where it reports one (as `pcihole bench` and its QEMU row
        measure it), else the host's wall time of the run."""
        return self.guest_scan_seconds if self.guest_scan_seconds is not None else self.seconds

    @property
    def devices(self) -> list:
        """What the guest found (the scan guest's report), or the machine's devices for another kernel."""
        if self.report is None:
            return self.machine_devices
        return sorted(self.report.devices, key=lambda d: d.address)

    @property
    def config_reads(self) -> int | None:
        return self.report.config_reads if self.report is not None else None

    def to_json(self) -> dict[str, object]:
        """The object `pcihole run --json` prints (docs/design.md, "Interfaces that are checked")."""
        return {
            "backend": self.backend,
            "strategy": self.strategy,
            "devices": [device_json(d) for d in self.devices],
            "stats": {
                "exits": self.stats.exits.as_dict(),
                "config_reads": self.config_reads,
                "scan_seconds": round(self.scan_seconds, 6),
                "hole_backing_bytes": self.memory.hole_backing_bytes,
                "memslots": self.memory.memslots,
            },
        }


def device_json(d) -> dict[str, object]:
    """One device of `pcihole run --json` (docs/design.md); `d` is a ScannedDevice or a DeviceInfo."""
    if hasattr(d, "as_json"):
        return d.as_json()
    return {
        "bdf": d.bdf,
        "vendor": f"{d.vendor:#06x}",
        "device": f"{d.device:#06x}",
        "class": f"{d.class_code:#08x}",
        "header_type": d.header_type,
    }


@dataclass
class Machine:
    spec: MachineFile
    hv: Hypervisor
    backend_reason: str
    vm: Vm
    vcpu: Vcpu
    memory: GuestMemory
    host_bridge: HostBridge
    hotplug: HotplugWiring
    image: ElfImage
    mmio: Bus
    pio: Bus
    serial: SerialConsole
    stats: RunStats
    #: Where the scan guest was told to put its device list (None: not the scan guest).
    device_area: DeviceArea | None = None

    quirks: HostQuirks = NO_QUIRKS
    #: The interrupt controller's inputs (KVM_IRQ_LINE on kvm); None where the backend has no irqchip.
    irq_lines: InterruptLines | None = None
    #: The command line the guest got (with the host quirks' arguments where they were asked for).
    cmdline: str = ""
    #: (guest-physical start, size) of the initrd, if one was loaded.
    initrd_range: tuple[int, int] | None = None
    #: COM1's THR writes land in the coalesced ring (builder._coalesce_console_writes).
    console_coalesced: bool = False
    #: With the C run loop (kvm): its table of the ECAM windows' pages (ecam_window.py);
    #: None: the Python loop answers every exit.
    fill_pages: FillPages | None = None

    @property
    def run_loop(self) -> str:
        """ "c" or "python": the vCPU loop this machine runs (builder.choose_run_loop)."""
        return "python" if self.fill_pages is None else "c"

    def run(
        self,
        timeout: float | None = None,
        stops: StopRequest | None = None,
        *,
        until_serial: str | None = None,
    ) -> RunResult:
        """Run the guest until it stops, `timeout` passes or `stops` is asked (a signal, any thread);
        with `until_serial`, also stop, with success, once the guest prints a line containing that
        text on COM1."""
        errors = InternalErrorHandler(self.quirks, self.vcpu, self.memory.read_guest, self.stats)
        handler = ExitHandler(
            self.mmio,
            self.pio,
            self.stats,
            on_internal_error=errors.handle,
            describe_internal_error=errors.describe,
        )
        start = time.perf_counter()
        stop_requested = None
        if until_serial is not None:
            self.serial.watch(until_serial)

            def stop_requested() -> Stop | None:
                if self.serial.matched is None:
                    return None
                return Stop(StopReason.SERIAL_MATCH, 0, f"the guest printed {self.serial.matched!r}")

        stop = run_until_stop(
            self.vcpu,
            handler,
            timeout=timeout,
            on_coalesced=self._coalesced,
            stops=stops,
            stop_requested=stop_requested,
            idle_check=self._halted_for_good if self.irq_lines is not None else None,
            flush_ring_within=CONSOLE_FLUSH_SECONDS if self.console_coalesced else None,
            fill_pages=self.fill_pages,
        )
        seconds = time.perf_counter() - start
        return RunResult(
            backend=self.hv.name,
            backend_reason=self.backend_reason,
            strategy=self.memory.strategy.name,
            stop=stop,
            seconds=seconds,
            stats=self.stats,
            memory=self.memory.stats(),
            serial=self.serial.text(),
            report=self.read_report(),
            machine_devices=self.host_bridge.devices(),
            guest_scan_seconds=self.guest_scan_seconds(),
        )

    def _halted_for_good(self) -> Stop | None:
        """A vCPU in HLT with interrupts disabled can never wake (no NMI source here): the run ends as
        a HLT exit ends it on a backend without an in-kernel LAPIC."""
        get_mp_state = getattr(self.vcpu, "get_mp_state", None)
        if get_mp_state is None or get_mp_state() != KVM_MP_STATE_HALTED:
            return None
        if self.vcpu.get_regs().rflags & X86_EFLAGS_IF:
            return None  # waiting for an interrupt, as an idle kernel does
        # Leave the vCPU runnable, past its HLT, as a KVM_EXIT_HLT leaves it: a host that sets new
        # registers and runs it again (tests do) gets it executing, not still asleep.
        self.vcpu.set_mp_state(KVM_MP_STATE_RUNNABLE)  # type: ignore[attr-defined]
        self.stats.exits.other += 1
        return Stop(StopReason.HALT, detail="the guest halted with interrupts disabled")

    def _coalesced(self, writes) -> None:
        view = self.memory.view
        before = view.counters.hole_writes_coalesced
        rest = view.coalesced(writes)
        self.stats.coalesced_writes += view.counters.hole_writes_coalesced - before
        for w in rest:  # the console's THR (a PIO zone), else nothing but the holes' zones
            if w.pio:
                self.stats.io_coalesced_by_port[w.addr] += 1
            device = (self.pio if w.pio else self.mmio).find(w.addr, len(w.data))
            if device is not None:
                device.write(w.addr, w.data)

    def read_report(self) -> ScanReport | None:
        if REPORT_SYMBOL not in self.image.symbols():
            return None
        try:
            return read_report(self.image, self.memory.read_guest, self.device_area)
        except ReportError:
            return None

    def guest_scan_seconds(self) -> float | None:
        """Seconds the guest's scans took by its TSC, which counts at the host's rate under KVM
        (pcihole sets no TSC frequency); None for a guest without `pcihole_timing`."""
        ticks = read_scan_tsc(self.image, self.memory.read_guest)
        if ticks is None:
            return None
        try:
            return tsc_clock().seconds(ticks)
        except TscUnknown:
            return None

    def close(self) -> None:
        """Stop and close the vCPU, then the VM, and only then free guest memory and the config
        mirrors (read-only slots map them until the VM is gone).

        The model's vCPU maps guest RAM into Unicorn zero-copy, and a vCPU paused in an exit is
        inside emu_start: until close() has made it leave, Unicorn may still touch those host
        pages (the rest of its translation block). On KVM the order costs nothing: closing the
        VM drops its memslots at once, so the memory layer's slot deletions are skipped.

        With the C run loop, run() must have returned first: the loop copies present functions'
        bytes out of the config mirror without a lock, and its seqlock only tells it, after the
        copy, that the bytes changed meanwhile; it cannot keep close_mirrors from unmapping the
        pages under a copy (the kvm_run page, which vcpu.close() unmaps, is in the same case).
        """
        try:
            self.vcpu.close()
            self.vm.close()
        finally:
            self.memory.close()
            self.host_bridge.close_mirrors()
            self.hv.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
