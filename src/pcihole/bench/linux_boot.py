"""The Linux-boot table (`pcihole bench --linux`): the Debian cloud kernel with pcihole's initramfs, booted
on the default machine once per strategy of each backend (kvm, and the model: Unicorn with pcihole's
interrupt delivery and interrupt controllers), and on QEMU as the peer.

Per row: how many ECAM reads reached the VMM (with `exit`, every read Linux made; with a hole strategy
only those of present functions), the exits, the absent-function exits (exits that landed in a hole
page), and the boot-to-/init time by the host's clock (the kernel's "Run /init as init process" line
arriving on the console; none where user space does not run, e.g. on a software KVM such as PVM).
Each row also checks that Linux listed exactly the machine's functions.

Peers: QEMU TCG (`-M q35 -accel tcg`, the same kernel, initramfs and command line, the machine's root
ports and endpoints as `-device` options) always; QEMU with KVM only on a hardware-KVM host (on a
software KVM QEMU cannot get past the guest's first emulation failure). QEMU's ECAM reads are not
counted (no hook in a stock QEMU): "—".

The model's rows are the seed's experiment: with `native` its PCI holes are KVM_MEM_PCI_HOLE slots.
Its target is a boot-to-/init within 3x QEMU TCG's (the same TCG underneath); docs/model-system-cpu.md
says where the rest of its time goes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pcihole.bench import qemu_peer
from pcihole.bench.child_process import run_child
from pcihole.bench.configs import Config
from pcihole.bench.errors import BenchError
from pcihole.linux import MIN_RAM_MIB
from pcihole.linux.cmdline import kernel_cmdline
from pcihole.linux.console import BootClock, LinuxReport, linux_stop_line, parse_linux_console
from pcihole.linux.fetch import LinuxFetchError, fetch_busybox, fetch_kernel
from pcihole.linux.initramfs import build_initramfs
from pcihole.machine.builder import MachineBuildError, build_machine
from pcihole.machine.machinefile import MachineFile
from pcihole.machine.stop_request import StopRelay

#: One boot; on a software KVM a boot takes minutes.
LINUX_TIMEOUT_SECONDS = 1800.0
QEMU_LINUX_TIMEOUT_SECONDS = 300.0
#: The backends pcihole boots Linux on.
LINUX_BACKENDS = ("kvm", "model")


@dataclass(frozen=True)
class LinuxFiles:
    vmlinux: Path
    initrd: bytes
    cmdline: str

    @property
    def kernel_name(self) -> str:
        return str(self.vmlinux)


def linux_files(extra_args: list[str] | None = None) -> LinuxFiles:
    """The cached kernel, pcihole's initramfs and the command line; BenchError where apt cannot give them."""
    try:
        vmlinux, busybox = fetch_kernel(), fetch_busybox()
    except LinuxFetchError as e:
        raise BenchError(f"Linux boot: {e}") from e
    return LinuxFiles(vmlinux, build_initramfs(busybox), kernel_cmdline(extra_args or []))


@dataclass
class LinuxBootRow:
    backend: str  # "kvm" | "qemu"
    strategy: str  # pcihole's strategy, or "tcg" / "kvm" for QEMU's accelerator
    #: host seconds from the start of the guest to /init; None where /init was not reached
    boot_seconds: float | None
    #: host seconds of the whole run (to power-off, or to the end of the run)
    run_seconds: float
    exits: dict[str, int] | None
    #: ECAM reads that reached the VMM as exits (None for QEMU: not countable)
    ecam_reads: int | None
    absent_exits: int | None
    devices: int
    #: where Linux's list came from: "initramfs" (/init's sysfs walk) or "kernel" (its enumeration lines)
    source: str
    powered_off: bool
    #: how the run ended: pcihole's stop reason ("power-off", "reboot", "timeout", ...), "power-off" for QEMU
    ended: str = ""
    note: str = ""
    #: port-I/O exits per port ("0x3f8": ...), None for QEMU; on a software KVM almost all are the console
    io_by_port: dict[str, int] | None = None

    @property
    def label(self) -> str:
        return f"qemu {self.strategy}" if self.backend == "qemu" else f"{self.backend} / {self.strategy}"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "label": self.label}


def _check_devices(report: LinuxReport, expected: list[tuple[str, int, int]], what: str) -> None:
    found = sorted((d.bdf, d.vendor, d.device) for d in report.devices)
    if found != expected:
        how = f" ({report.panic})" if report.panic else ""
        raise BenchError(f"{what}: Linux listed {found}{how}, the machine has {expected}")


def boot_on_pcihole(
    spec: MachineFile,
    config: Config,
    files: LinuxFiles,
    timeout: float = LINUX_TIMEOUT_SECONDS,
    stops: StopRelay | None = None,
) -> LinuxBootRow:
    """One Linux boot on pcihole; BenchError if it fails or Linux lists other functions than the machine's."""
    clock = BootClock()
    what = f"Linux on {config.label}"
    try:
        machine = build_machine(
            spec,
            backend=config.backend,
            strategy=config.strategy,
            kernel=files.vmlinux.read_bytes(),
            kernel_name=files.kernel_name,
            cmdline=files.cmdline,
            initrd=files.initrd,
            serial_sink=clock,
            host_quirks="auto",
            quirk_kernel_args=True,
        )
    except (MachineBuildError, OSError) as e:
        raise BenchError(f"{what}: cannot build the machine: {e}") from e
    with machine:
        clock.restart()
        result = machine.run(
            timeout=timeout,
            until_serial=linux_stop_line(machine.quirks.active),
            stops=stops.for_run() if stops else None,
        )
    report = parse_linux_console(result.serial)
    expected = sorted((str(f.bdf), f.vendor, f.device) for f in spec.topology.functions())
    _check_devices(report, expected, f"{what} ({result.stop.reason})")
    note = ""
    if report.source == "kernel":
        note = "user space did not run: the list is the kernel's enumeration lines"
        if report.panic:
            note += f" ({report.panic})"
    return LinuxBootRow(
        backend=config.backend,
        strategy=config.strategy,
        boot_seconds=clock.boot_seconds,
        run_seconds=result.seconds,
        exits=result.stats.exits.as_dict(),
        ecam_reads=result.stats.ecam_reads,
        absent_exits=result.stats.ecam_absent_exits,
        devices=len(report.devices),
        source=report.source,
        powered_off=report.powered_off,
        ended=str(result.stop.reason),
        note=note,
        io_by_port={f"{port:#x}": n for port, n in sorted(result.stats.io_by_port.items())},
    )


def qemu_linux_command(spec: MachineFile, files: LinuxFiles, initrd_path: Path, accel: str) -> list[str]:
    qemu = shutil.which(qemu_peer.QEMU_BINARY) or qemu_peer.QEMU_BINARY
    return [
        qemu,
        "-M", "q35",
        "-accel", accel,
        "-m", str(spec.ram_mib),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-serial", "stdio",
        "-kernel", str(files.vmlinux),
        "-initrd", str(initrd_path),
        "-append", files.cmdline,
        *qemu_peer.qemu_device_args(spec),
    ]  # fmt: skip


def boot_on_qemu(
    spec: MachineFile,
    files: LinuxFiles,
    accel: str = "tcg",
    timeout: float = QEMU_LINUX_TIMEOUT_SECONDS,
    stops: StopRelay | None = None,
) -> LinuxBootRow:
    """One boot of the same kernel, initramfs and command line on QEMU q35 with the machine's devices;
    a stop asked through `stops` ends QEMU at once (child_process.py) and the row with a BenchError."""
    with tempfile.TemporaryDirectory(prefix="pcihole-linux-") as tmp:
        initrd_path = Path(tmp) / "initramfs.cpio.gz"
        initrd_path.write_bytes(files.initrd)
        command = qemu_linux_command(spec, files, initrd_path, accel)
        # The console is read as it comes, so that /init's arrival is timed by the host's clock.
        clock = BootClock()
        try:
            proc = run_child(command, timeout=timeout, stops=stops, on_stdout=clock)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"QEMU ({accel}) did not power Linux off in {timeout:g} s") from e
        except OSError as e:
            raise BenchError(f"cannot start QEMU: {e}") from e
        run_seconds = time.perf_counter() - clock.start
        stderr = proc.stderr
    if proc.stopped:
        raise BenchError(f"QEMU ({accel}) was stopped")
    report = parse_linux_console(clock.text())
    what = f"Linux on QEMU ({accel})"
    if not report.powered_off:
        raise BenchError(
            f"{what}: did not power off (exit status {proc.returncode}): {stderr.strip()[-300:]}"
        )
    _check_devices(report, qemu_peer.expected_functions(spec), what)
    return LinuxBootRow(
        backend="qemu",
        strategy=accel,
        boot_seconds=clock.boot_seconds,
        run_seconds=run_seconds,
        exits=None,
        ecam_reads=None,
        absent_exits=None,
        devices=len(report.devices),
        source=report.source,
        powered_off=report.powered_off,
        ended="power-off",
        note="QEMU's process wall time includes its firmware (SeaBIOS); ECAM reads are not counted in QEMU",
    )


def with_linux_ram(spec: MachineFile) -> MachineFile:
    """`spec` with at least the RAM a Linux boot needs (pcihole.linux.MIN_RAM_MIB)."""
    return spec if spec.ram_mib >= MIN_RAM_MIB else replace(spec, ram_mib=MIN_RAM_MIB)


def measure_linux(
    spec: MachineFile,
    configs: list[Config],
    hardware_kvm: bool,
    on_row: Callable[[str], None] = lambda what: None,
    files: LinuxFiles | None = None,
    stops: StopRelay | None = None,
) -> tuple[list[LinuxBootRow], dict[str, str]]:
    """Every row of the Linux-boot table, and what was skipped or failed (label -> why): one boot that
    fails (minutes into a software-KVM boot) leaves its row out with the reason, not the whole bench."""
    files = files or linux_files()
    spec = with_linux_ram(spec)
    rows: list[LinuxBootRow] = []
    skipped: dict[str, str] = {}
    for config in configs:
        if config.backend not in LINUX_BACKENDS:
            skipped[config.backend] = f"pcihole boots Linux on {', '.join(LINUX_BACKENDS)} only"
            continue
        try:
            rows.append(boot_on_pcihole(spec, config, files, stops=stops))
        except BenchError as e:
            skipped[config.label] = f"failed: {e}"
        on_row(config.label)
    if shutil.which(qemu_peer.QEMU_BINARY) is None:
        skipped["qemu"] = f"{qemu_peer.QEMU_BINARY} is not installed"
        return rows, skipped
    for accel in ("tcg", "kvm") if hardware_kvm else ("tcg",):
        try:
            rows.append(boot_on_qemu(spec, files, accel, stops=stops))
        except BenchError as e:
            skipped[f"qemu {accel}"] = f"failed: {e}"
        on_row(f"qemu {accel}")
    if not hardware_kvm:
        skipped["qemu kvm"] = "not a hardware-KVM host: QEMU+KVM cannot boot Linux on a software KVM"
    return rows, skipped
