"""QEMU as a peer: the same scan guest on the same machine under `qemu-system-x86_64 -M q35 -accel kvm`.

q35's MMCONFIG is an MMIO region with no memslot, so every ECAM access the guest makes exits to QEMU
(QEMU's answer is pcihole's `exit` strategy, in C). The default machine is rebuilt in QEMU terms:
q35 already has the host bridge and the ICH9 functions at 00:1f.x; root ports and the endpoints below
them become `-device` options. The row is kept only if QEMU's guest found the same functions as
pcihole's machine has, so both scans are the same scan.

QEMU's process wall time is mostly its firmware (SeaBIOS, which also numbers the bridges' buses) and
its start-up, so the scan is timed the way pcihole's rows are: TSC ticks the guest counts around the
scan (`pcihole.timing`), printed on the done line. The guest is not quiet here: its device lines are
how the functions are checked, and it prints them after the timed scan.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from pcihole.bench.child_process import run_child
from pcihole.bench.errors import BenchError
from pcihole.bench.scan import ScanRow
from pcihole.bench.summary import Summary
from pcihole.guest import IMAGE_PATH
from pcihole.guest.report import ReportError, SerialReport, parse_serial
from pcihole.host.tsc import TscClock
from pcihole.machine.machinefile import MachineFile
from pcihole.machine.stop_request import StopRelay

QEMU_BINARY = "qemu-system-x86_64"
#: QEMU's isa-debug-exit exits with (value << 1) | 1: the guest writes its status, 0 when clean.
QEMU_EXIT_CLEAN = 1
QEMU_TIMEOUT_SECONDS = 120
#: Timed, and listing what it found (after the timed scan) so that the functions can be checked.
QEMU_GUEST_CMDLINE = "pcihole.timing"
#: Functions q35 itself provides (MCH host bridge, ICH9 LPC / AHCI / SMBus): ids as QEMU 7.2 has them.
Q35_BUILTIN = {
    "0000:00:00.0": (0x8086, 0x29C0),
    "0000:00:1f.0": (0x8086, 0x2918),
    "0000:00:1f.2": (0x8086, 0x2922),
    "0000:00:1f.3": (0x8086, 0x2930),
}
#: QEMU devices for the endpoint ids machine files use below root ports; `{n}` numbers the backends.
QEMU_ENDPOINTS = {
    (0x1AF4, 0x1041): ["virtio-net-pci"],
    (0x1AF4, 0x1042): ["-blockdev", "driver=null-co,node-name=blk{n}", "virtio-blk-pci,drive=blk{n}"],
    (0x1B36, 0x0010): ["-blockdev", "driver=null-co,node-name=blk{n}", "nvme,drive=blk{n},serial=pcihole{n}"],
}


def unavailable_reason() -> str | None:
    if shutil.which(QEMU_BINARY) is None:
        return f"{QEMU_BINARY} is not installed"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm cannot be opened (QEMU would run the guest under TCG: not a peer)"
    return None


def qemu_device_args(spec: MachineFile) -> list[str]:
    """`-device` (and `-blockdev`) options that give q35 the machine file's functions; BenchError if
    the machine has something this mapping does not know (a second segment, an unknown endpoint)."""
    topology = spec.topology
    if len(topology.segments) != 1 or topology.segments[0].start_bus != 0:
        raise BenchError(f"{spec.path}: QEMU q35 has one segment starting at bus 0")
    args: list[str] = []
    port_ids: dict[int, str] = {}  # secondary bus -> port id
    for n, port in enumerate(sorted(topology.root_ports, key=lambda p: p.bdf.devfn), start=1):
        if port.bdf.bus != 0:
            raise BenchError(f"{spec.path}: root port {port.bdf} is not on bus 0")
        multifunction = port.bdf.function == 0 and topology.is_multifunction(port.bdf)
        port_ids[port.secondary] = f"rp{n}"
        options = [
            "pcie-root-port",
            f"id=rp{n}",
            "bus=pcie.0",
            f"addr={port.bdf.device:#x}.{port.bdf.function:#x}",
            f"chassis={n}",
            f"slot={port.slot_number}",
        ]
        if multifunction:
            options.append("multifunction=on")
        args += ["-device", ",".join(options)]
    for n, ep in enumerate(topology.endpoints):
        key = str(ep.bdf)
        if key in Q35_BUILTIN:
            if Q35_BUILTIN[key] != (ep.vendor, ep.device):
                raise BenchError(
                    f"{spec.path}: {key} is {ep.vendor:04x}:{ep.device:04x}, q35 has another function there"
                )
            continue
        template = QEMU_ENDPOINTS.get((ep.vendor, ep.device))
        if template is None or ep.bdf.bus not in port_ids or ep.bdf.devfn != 0:
            raise BenchError(
                f"{spec.path}: no QEMU device for endpoint {key} ({ep.vendor:04x}:{ep.device:04x})"
            )
        pieces = [p.format(n=n) for p in template]
        *blockdev, device = pieces
        args += blockdev + ["-device", f"{device},bus={port_ids[ep.bdf.bus]}"]
    return args


def expected_functions(spec: MachineFile) -> list[tuple[str, int, int]]:
    """(bdf, vendor, device) the guest should find on QEMU: the machine's, with q35's own ids where
    q35 provides the function (its host bridge is Intel's MCH, pcihole's is QEMU's generic one)."""
    found = []
    for f in spec.topology.functions():
        bdf = str(f.bdf)
        vendor, device = Q35_BUILTIN.get(bdf, (f.vendor, f.device))
        found.append((bdf, vendor, device))
    return sorted(found)


def qemu_command(spec: MachineFile, cmdline: str = QEMU_GUEST_CMDLINE) -> list[str]:
    qemu = shutil.which(QEMU_BINARY) or QEMU_BINARY
    return [
        qemu,
        "-M", "q35",
        "-accel", "kvm",
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-serial", "stdio",
        "-kernel", str(IMAGE_PATH),
        "-append", cmdline,
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        *qemu_device_args(spec),
    ]  # fmt: skip


@dataclass(frozen=True)
class QemuBoot:
    """One boot of the scan guest on QEMU: what it printed, and QEMU's process wall time."""

    serial: SerialReport
    scan_tsc: int
    wall_seconds: float


def boot_on_qemu(
    spec: MachineFile, stops: StopRelay | None = None, cmdline: str = QEMU_GUEST_CMDLINE
) -> QemuBoot:
    """Boot the scan guest once on QEMU with `cmdline` (which must keep QEMU_GUEST_CMDLINE's options);
    BenchError if it fails, if the guest found other functions than the machine has, or when a stop
    asked through `stops` ended QEMU (child_process.py)."""
    command = qemu_command(spec, cmdline)
    start = time.perf_counter()
    out = bytearray()
    try:
        proc = run_child(command, timeout=QEMU_TIMEOUT_SECONDS, stops=stops, on_stdout=out.extend)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"QEMU did not finish in {QEMU_TIMEOUT_SECONDS} s") from e
    except OSError as e:
        raise BenchError(f"cannot start QEMU: {e}") from e
    if proc.stopped:
        raise BenchError("QEMU was stopped")
    wall_seconds = time.perf_counter() - start
    try:
        serial = parse_serial(out.decode(errors="replace"))
    except ReportError as e:
        raise BenchError(f"QEMU's guest output: {e}") from e
    if proc.returncode != QEMU_EXIT_CLEAN or not serial.done or serial.scan_tsc is None:
        raise BenchError(
            f"QEMU exited {proc.returncode} without a clean timed scan: {proc.stderr.strip()[-300:]}"
        )
    found = sorted((d.bdf, d.vendor, d.device) for d in serial.devices)
    expected = expected_functions(spec)
    if found != expected:
        raise BenchError(f"QEMU's guest found {found}, the machine has {expected}: not the same scan")
    return QemuBoot(serial, serial.scan_tsc, wall_seconds)


def scan_on_qemu(
    spec: MachineFile,
    runs: int,
    clock: TscClock,
    on_run: Callable[[], None] = lambda: None,
    stops: StopRelay | None = None,
) -> ScanRow:
    """Boot the scan guest `runs` times on QEMU; the row of the scan table (BenchError on failure, or
    when a stop asked through `stops` ended QEMU: child_process.py)."""
    scan_seconds, wall_seconds = [], []
    config_reads = devices = 0
    for _ in range(runs):
        boot = boot_on_qemu(spec, stops)
        wall_seconds.append(boot.wall_seconds)
        scan_seconds.append(clock.seconds(boot.scan_tsc))
        config_reads, devices = boot.serial.config_reads, boot.serial.ndevices
        on_run()
    return ScanRow(
        backend="qemu",
        strategy="exit",
        runs=runs,
        scan_seconds=Summary.of(scan_seconds),
        run_seconds=Summary.of(wall_seconds),
        exits=None,
        # q35's MMCONFIG has no memslot: every config read is an MMIO exit to QEMU.
        ecam_exits=config_reads,
        absent_exits=None,
        config_reads=config_reads,
        devices=devices,
        hole_backing_bytes=None,
        memslots=None,
        hole_mappings=None,
        vm_pte_growth_bytes=None,
        process_mappings_growth=None,
        note="ECAM exits = config reads (q35 MMCONFIG is MMIO, no memslot); run time is QEMU's process wall time",
    )
