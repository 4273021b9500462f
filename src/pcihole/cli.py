"""`pcihole run | acpi | linux | bench`: the command line.

Errors a user can reach print one line, `pcihole: error: ...`, and exit non-zero: 2 for bad input
(arguments, machine files, images, a strategy the backend cannot do), 1 when the guest or the host
fails (timeout, triple fault, /dev/kvm missing or not permitted, KVM errors). Never a traceback: an
error pcihole did not foresee is one line too (`internal error: ...`; -v logs the traceback).
SIGINT / SIGTERM end `pcihole run` and `pcihole bench` with `pcihole: interrupted` / `pcihole:
terminated` and status 130 / 143 (128 + the signal), the guest stopped and the machine closed first.
README.md "## Errors" lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import traceback
from typing import TYPE_CHECKING

from pcihole.host.exit_status import EXIT_FAILED, EXIT_OK, EXIT_SIGNAL_BASE, EXIT_USAGE
from pcihole.machine.dispatch import SUCCESSFUL_STOPS, Stop, StopReason
from pcihole.machine.host_quirks import HOST_QUIRKS_CHOICES

if TYPE_CHECKING:
    from pcihole.machine.stop_request import StopRequest

BACKENDS = ("auto", "kvm", "model")
STRATEGIES = ("auto", "exit", "ro-filled", "ro-alias", "native", "mmio-bus")
#: The embedded guest prints only its summary line: one port exit per character would otherwise
#: outnumber the ECAM exits being measured. pcihole prints the device list from the guest's report.
EMBEDDED_GUEST_CMDLINE = "pcihole.quiet"
#: A Debian vmlinux is about 51 MiB; anything ten times larger is not a kernel pcihole can boot.
KERNEL_FILE_MAX = 512 << 20
DEFAULT_TIMEOUT = 60.0
#: A Linux boot takes seconds on hardware KVM, but minutes on a software KVM such as PVM.
LINUX_TIMEOUT = 1800.0


class UsageError(Exception):
    """Bad input: exit status 2."""


class RunFailed(Exception):
    """The run did not end well: exit status 1."""


class Signalled(Exception):
    """SIGINT or SIGTERM ended the run: exit status 128 + the signal (130, 143)."""

    WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}

    def __init__(self, signum: int) -> None:
        super().__init__(self.WORDS.get(signal.Signals(signum), f"signal {signum}"))
        self.status = EXIT_SIGNAL_BASE + signum


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a UsageError (one line) instead of usage text and exit(2)."""

    def error(self, message: str):  # type: ignore[override]
        command = self.prog.removeprefix("pcihole").strip()  # "run" for `pcihole run`'s parser
        raise UsageError(f"{command + ': ' if command else ''}{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="pcihole", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log what pcihole does")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot the embedded scan guest (or --kernel) on a machine")
    run.add_argument(
        "--machine", metavar="FILE.toml", help="machine file (default: the embedded default machine)"
    )
    run.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="kvm where /dev/kvm opens, else model"
    )
    run.add_argument("--strategy", choices=STRATEGIES, default="auto", help="how ECAM holes are implemented")
    output = run.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object")
    output.add_argument("--tree", action="store_true", help="print the devices as a tree, as lspci -t does")
    run.add_argument("--kernel", metavar="FILE", help="boot this PVH ELF instead of the embedded guest")
    run.add_argument(
        "--linux",
        action="store_true",
        help="boot the Debian cloud kernel (fetched and cached on first use) with pcihole's initramfs "
        "and print what Linux's PCI core found",
    )
    run.add_argument(
        "--append", metavar="CMDLINE", help="kernel command line (added to the default with --linux)"
    )
    run.add_argument(
        "--initrd", metavar="FILE", help="initramfs for --kernel (PVH module 0, placed above the kernel)"
    )
    run.add_argument(
        "--host-quirks",
        choices=HOST_QUIRKS_CHOICES,
        default="auto",
        help="workarounds for a software KVM (PVM), kvm backend only: auto turns them on only where "
        "/sys/module/kvm_pvm exists (none on the model)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"stop a runaway guest after this many seconds (default {DEFAULT_TIMEOUT:g}, {LINUX_TIMEOUT:g} "
        "with --linux; 'inf' for no limit)",
    )

    acpi = sub.add_parser(
        "acpi",
        help="write the machine's ACPI tables as RSDP.dat, XSDT.dat, FACP.dat, DSDT.dat, APIC.dat, MCFG.dat",
    )
    acpi.add_argument("--machine", metavar="FILE.toml")
    acpi.add_argument("--out", required=True, metavar="DIR")

    linux = sub.add_parser("linux", help="the Linux kernel and busybox pcihole boots with --linux")
    linux_sub = linux.add_subparsers(dest="linux_command", required=True)
    linux_sub.add_parser(
        "fetch",
        help="fetch the Debian cloud kernel and busybox-static with apt (no install) and print the cached paths",
    )

    bench = sub.add_parser("bench", help="run the strategies side by side")
    bench.add_argument(
        "--out", default="bench-out", metavar="DIR", help="where to write JSON, markdown and plots"
    )
    bench.add_argument("--quick", action="store_true", help="a run under a minute")
    bench.add_argument("--backend", choices=BACKENDS, action="append", help="limit to these backends")
    bench.add_argument(
        "--linux",
        action="store_true",
        help="add the Linux-boot table: the Debian kernel on every kvm strategy and on QEMU "
        "(minutes per boot on a software KVM)",
    )
    return p


def _not_empty(value: str | None, option: str) -> None:
    """An empty name is a mistake (an unset shell variable), not "the default" or "here"."""
    if value == "":
        raise UsageError(f"{option}: an empty file name names no file")


def _output_dir(path: str, option: str) -> str:
    """Make the directory and check that a file can be created in it, before any work is done."""
    _not_empty(path, option)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pcihole-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{path}: cannot write there: {e.strerror}") from None
    return path


def _read_input(path: str, *, limit: int, what: str) -> bytes:
    """A bounded read of a user's file (host/input_file.py); every problem is a UsageError."""
    from pcihole.host.input_file import InputFileError, read_input_file

    try:
        return read_input_file(path, limit=limit, what=what)
    except InputFileError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None


def _timeout(seconds: float) -> float | None:
    """--timeout in seconds, or None for no limit (inf, or too long for the host's timer to wait)."""
    if not seconds > 0:  # also refuses nan
        raise UsageError(f"--timeout must be a positive number of seconds, not {seconds}")
    if math.isinf(seconds) or seconds >= threading.TIMEOUT_MAX:
        return None
    return seconds


def _load_machine(path: str | None):
    from pcihole.machine.machinefile import MachineFileError, load, load_default

    _not_empty(path, "--machine")
    try:
        return load(path) if path is not None else load_default()
    except MachineFileError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None


def cmd_run(args: argparse.Namespace) -> int:
    """`pcihole run`. SIGINT and SIGTERM ask the run to stop (host/signals.py says why through a
    thread): the vCPU is kicked, the run loop returns, the machine is closed, then Signalled."""
    from pcihole.host.signals import signals_to_thread
    from pcihole.machine.stop_request import StopRequest

    stops = StopRequest()
    try:
        with signals_to_thread(lambda signum: stops.request(Stop(StopReason.SIGNAL, status=int(signum)))):
            status = _run(args, stops)
    except Exception:
        _raise_if_signalled(stops.stop)  # the signal, not what it made fail, is the outcome
        raise
    _raise_if_signalled(stops.stop)
    return status


def _raise_if_signalled(stop: Stop | None) -> None:
    if stop is not None and stop.reason == StopReason.SIGNAL and stop.status is not None:
        raise Signalled(stop.status)


def _run(args: argparse.Namespace, stops: StopRequest) -> int:
    from pcihole.machine.builder import default_kernel

    if args.timeout is None:
        args.timeout = LINUX_TIMEOUT if args.linux else DEFAULT_TIMEOUT
    timeout = _timeout(args.timeout)
    if args.linux and args.kernel is not None:
        raise UsageError("--linux boots the cached Debian kernel: give --linux or --kernel, not both")
    if args.linux and args.initrd is not None:
        raise UsageError("--linux brings pcihole's own initramfs: use --kernel with --initrd for another")
    if args.host_quirks == "pvm" and args.backend == "model":
        raise UsageError("--host-quirks pvm works around a software KVM: the model backend needs none")
    _not_empty(args.kernel, "--kernel")
    if args.append is not None:
        try:
            args.append.encode()
        except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as surrogates
            bad = os.fsencode(args.append[e.start : e.end])
            raise UsageError(f"--append: the command line is not UTF-8 text (byte {bad[0]:#04x})") from None
    spec = _load_machine(args.machine)
    if args.linux:
        return _run_linux(args, spec, timeout, stops)
    if args.kernel is not None:
        kernel = _read_input(args.kernel, limit=KERNEL_FILE_MAX, what="a kernel")
        kernel_name = args.kernel
        cmdline = args.append or ""
    else:
        if args.initrd:
            raise UsageError("--initrd needs --kernel (the embedded guest takes no initrd)")
        kernel, kernel_name = default_kernel()
        cmdline = args.append if args.append is not None else EMBEDDED_GUEST_CMDLINE
    initrd = None
    if args.initrd:
        initrd = _read_input(args.initrd, limit=KERNEL_FILE_MAX, what="an initrd")
    # The guest's serial output streams to stdout for --kernel (as QEMU's -serial stdio); the
    # embedded guest's is summarised by pcihole instead.
    sink = None
    if args.kernel is not None and not args.json:
        out = sys.stdout.buffer

        def sink(b: bytes) -> None:
            out.write(b)
            out.flush()

    machine = _build(
        spec,
        args,
        kernel=kernel,
        kernel_name=kernel_name,
        cmdline=cmdline,
        serial_sink=sink,
        initrd=initrd,
        quirk_kernel_args=bool(args.kernel),
    )
    with machine:
        result = _run_machine(machine, kernel_name, timeout=timeout, stops=stops)
        tree = _tree(result, machine) if args.tree else None
    if result.stop.reason == StopReason.SIGNAL:
        return EXIT_FAILED  # cmd_run raises Signalled: its one line is all that is printed
    # Decide the outcome first: a failed run prints its one error line, not the informational lines.
    failure = _failure(result, kernel_name, args.timeout)
    if failure is not None:
        if args.json:
            print(json.dumps(result.to_json(), indent=2))
        raise RunFailed(failure)
    if not args.json:
        quirks = machine.quirks
        print(
            f"pcihole: backend {result.backend} ({result.backend_reason}), strategy {result.strategy}"
            + (f", host quirks {quirks.name} ({quirks.why})" if quirks.active else ""),
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif args.kernel is not None:
        if tree is not None:
            print(tree, end="")
        _print_stats(result, file=sys.stderr)
    else:
        if tree is not None:
            print(tree, end="")
        else:
            _print_devices(result.devices)
        _print_stats(result, file=sys.stdout)
    return EXIT_OK


def _tree(result, machine) -> str:
    """lspci -t of what the scan guest found, or, for another kernel, of the machine's functions."""
    from pcihole.pci.lspci_tree import TreeDevice, lspci_tree, tree_devices

    if result.report is None:
        return lspci_tree(tree_devices(machine.host_bridge))
    return lspci_tree(
        TreeDevice(
            *(d.address.segment, d.address.bus, d.address.device, d.address.function),
            *(d.class_code, d.header_type, d.secondary, d.subordinate),
        )
        for d in result.report.devices
    )


def _build(spec, args: argparse.Namespace, **what):
    """The machine for `pcihole run` (`what`: the kernel, its command line, initrd, serial sink...):
    bad input is a UsageError, a host that cannot run it a RunFailed."""
    from pcihole.machine.builder import HostUnavailable, MachineBuildError, build_machine

    try:
        return build_machine(
            spec, backend=args.backend, strategy=args.strategy, host_quirks=args.host_quirks, **what
        )
    except HostUnavailable as e:
        raise RunFailed(str(e)) from None
    except MachineBuildError as e:
        raise UsageError(str(e)) from None


def _check(spec, args: argparse.Namespace) -> None:
    """What _build would refuse before it builds anything (builder.check_machine), as _build says it."""
    from pcihole.machine.builder import HostUnavailable, MachineBuildError, check_machine

    try:
        check_machine(spec, args.backend)
    except HostUnavailable as e:
        raise RunFailed(str(e)) from None
    except MachineBuildError as e:
        raise UsageError(str(e)) from None


def _run_machine(machine, kernel_name: str, **how):
    """machine.run(**how); a backend failure while the guest runs is a RunFailed naming the kernel."""
    try:
        return machine.run(**how)
    except OSError as e:
        raise RunFailed(
            f"{kernel_name}: the {machine.hv.name} backend failed while running the guest: {e}"
        ) from None


def _linux_inputs(append: str | None) -> tuple[bytes, str, bytes, str]:
    """(vmlinux, its name, the initramfs, the command line; the builder adds the host quirks'
    arguments) for --linux; RunFailed if the kernel or busybox cannot be fetched (apt missing, package unavailable: the host's fault, not the input's)."""
    from pcihole.linux.cmdline import kernel_cmdline
    from pcihole.linux.fetch import LinuxFetchError, fetch_busybox, fetch_kernel
    from pcihole.linux.initramfs import build_initramfs

    try:
        vmlinux, busybox = fetch_kernel(), fetch_busybox()
        kernel = vmlinux.read_bytes()
        initrd = build_initramfs(busybox)
    except LinuxFetchError as e:
        raise RunFailed(f"--linux: {e}") from None
    except OSError as e:
        raise RunFailed(f"--linux: cannot read the cached kernel or busybox: {e}") from None
    return kernel, str(vmlinux), initrd, kernel_cmdline(append=append)


#: A Linux run that stopped this way did not finish what it was doing, whatever the console shows.
LINUX_FAILED_STOPS = (
    StopReason.TIMEOUT,
    StopReason.INTERNAL_ERROR,
    StopReason.FAIL_ENTRY,
    StopReason.UNKNOWN_EXIT,
)


def _run_linux(args: argparse.Namespace, spec, timeout: float | None, stops: StopRequest) -> int:
    from pcihole.linux import MIN_RAM_MIB
    from pcihole.linux.console import BootClock, linux_stop_line, parse_linux_console

    given = spec
    spec = dataclasses.replace(spec, ram_mib=max(spec.ram_mib, MIN_RAM_MIB))
    _check(spec, args)  # a machine pcihole refuses is refused before the kernel is fetched
    kernel, kernel_name, initrd, cmdline = _linux_inputs(args.append)
    if given.ram_mib < MIN_RAM_MIB:
        print(
            f"pcihole: --linux: {given.name or given.path} has {given.ram_mib} MiB of RAM; giving Linux {MIN_RAM_MIB} MiB",
            file=sys.stderr,
        )
    # The console goes to stderr as it comes (a boot can take minutes on a software KVM); stdout
    # keeps what Linux found and the statistics.
    err = sys.stderr.buffer

    def to_stderr(b: bytes) -> None:
        err.write(b)
        err.flush()

    clock = BootClock(forward=None if args.json else to_stderr)
    machine = _build(
        spec,
        args,
        kernel=kernel,
        kernel_name=kernel_name,
        cmdline=cmdline,
        initrd=initrd,
        serial_sink=clock,
        quirk_kernel_args=True,
    )
    with machine:
        clock.restart()
        result = _run_machine(
            machine,
            kernel_name,
            timeout=timeout,
            stops=stops,
            until_serial=linux_stop_line(machine.quirks.active),
        )
    if result.stop.reason == StopReason.SIGNAL:
        return EXIT_FAILED  # cmd_run raises Signalled: its one line is all that is printed
    report = parse_linux_console(result.serial)
    linux = {
        "devices": [d.as_json() for d in report.devices],
        "boot_seconds": None if clock.boot_seconds is None else round(clock.boot_seconds, 3),
        "ecam_reads": result.stats.ecam_reads,
        "ecam_absent_exits": result.stats.ecam_absent_exits,
        "source": report.source,
        "reached_init": report.reached_init,
        "powered_off": report.powered_off,
        "mcfg": report.mcfg_lines,
    }
    where = f"{result.backend} backend, strategy {result.strategy}"
    failure = None
    if result.stop.reason in LINUX_FAILED_STOPS:
        failure = _failure(result, kernel_name, args.timeout)
    elif not report.devices:
        how = report.panic or f"the run ended with {result.stop.reason} {result.stop.detail}".strip()
        failure = f"{kernel_name}: Linux listed no PCI function ({how}) ({where})"
    if args.json:
        print(json.dumps({**result.to_json(), "linux": linux}, indent=2))
    elif report.devices:
        # Printed even when the run then fails (a timeout after the PCI scan on a slow software KVM):
        # what Linux enumerated is known, and the error line says how the run ended.
        _print_linux(result, report, clock.boot_seconds)
    if failure is not None:
        raise RunFailed(failure)
    return EXIT_OK


def _print_linux(result, report, boot_seconds: float | None) -> None:
    print(
        f"pcihole: backend {result.backend} ({result.backend_reason}), strategy {result.strategy}",
        file=sys.stderr,
    )
    if report.source == "kernel":
        print(
            "pcihole: /init did not list the functions"
            f"{' (' + report.panic + ')' if report.panic else ''}: this is the kernel's own enumeration",
            file=sys.stderr,
        )
    _print_devices(report.devices)
    _print_stats(result, file=sys.stdout)
    rows = [
        ("Linux's list from", report.source),
        ("ECAM reads that exited", result.stats.ecam_reads),
        ("boot to /init (host clock)", "-" if boot_seconds is None else f"{boot_seconds:.2f} s"),
        ("powered off", "yes" if report.powered_off else "no"),
    ]
    for k, v in rows:
        print(f"{k:<38}  {v}")


def _failure(result, kernel_name: str, timeout: float) -> str | None:
    """None if the guest ended well (debug-exit 0, or HLT); else the one-line error, naming the kernel."""
    stop = result.stop
    if stop.reason == StopReason.DEBUG_EXIT and stop.status == 0:
        return None
    if stop.reason in SUCCESSFUL_STOPS:
        return None
    where = f"{result.backend} backend, strategy {result.strategy}"
    if stop.reason == StopReason.DEBUG_EXIT:
        detail = f"the guest ended with status {stop.status:#x}"
        if result.report is not None:
            from pcihole.guest.report import status_names

            detail += f" ({', '.join(status_names(stop.status)) or 'no known bits'})"
        return f"{kernel_name}: {detail} ({where})"
    if stop.reason == StopReason.TIMEOUT:
        return f"{kernel_name}: timeout: the guest was still running after --timeout {timeout:g} s ({where})"
    return f"{kernel_name}: {stop.reason}: {stop.detail} ({where})"


def _print_devices(devices) -> None:
    from pcihole.pci.class_names import class_name

    for d in devices:
        print(f"{d.bdf} {class_name(d.class_code)} [{d.class_code >> 8:04x}]: {d.vendor:04x}:{d.device:04x}")


def _print_stats(result, file) -> None:
    s = result.stats
    e = s.exits
    rows = [
        ("backend / strategy", f"{result.backend} / {result.strategy}"),
        ("exits (mmio read / write / io / total)", f"{e.mmio_read} / {e.mmio_write} / {e.io} / {e.total}"),
        ("ECAM exits", s.ecam_exits),
        ("config reads (guest)", "-" if result.config_reads is None else result.config_reads),
        ("hole writes coalesced (no exit)", s.coalesced_writes),
        ("console writes coalesced (no exit)", s.io_coalesced_by_port.total()),
        (
            "scan time (guest TSC)" if result.guest_scan_seconds is not None else "run time (host)",
            f"{result.scan_seconds * 1000:.1f} ms",
        ),
        ("hole backing", f"{result.memory.hole_backing_bytes} bytes"),
        ("memslots", result.memory.memslots),
        ("host mappings for holes", result.memory.hole_mappings),
    ]
    width = max(len(k) for k, _ in rows)
    print("", file=file)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=file)


def cmd_acpi(args: argparse.Namespace) -> int:
    from pcihole.acpi import write_tables
    from pcihole.machine.builder import MachineBuildError, acpi_tables

    _not_empty(args.out, "--out")
    spec = _load_machine(args.machine)
    try:
        tables = acpi_tables(spec)  # refuses what `pcihole run` could not load
    except MachineBuildError as e:
        raise UsageError(str(e)) from None
    _output_dir(args.out, "--out")
    try:
        paths = write_tables(tables, args.out)
    except OSError as e:
        raise UsageError(f"{args.out}: {e.strerror}") from None
    for path in paths:
        print(path)
    return EXIT_OK


def cmd_linux(args: argparse.Namespace) -> int:
    from pcihole.linux.fetch import LinuxFetchError, fetch_busybox_entry, fetch_kernel_entry

    try:
        entries = {"kernel": fetch_kernel_entry(), "busybox": fetch_busybox_entry()}
    except LinuxFetchError as e:
        raise RunFailed(str(e)) from None
    for what, entry in entries.items():
        print(f"{what:<8} {entry.path}  ({entry.package} {entry.version})")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """`pcihole bench`. SIGINT and SIGTERM stop it as they stop `pcihole run` (cmd_run): the guest run
    in progress is kicked, nothing more is measured, no result is written, then Signalled."""
    from pcihole.bench.runner import run_bench
    from pcihole.host.signals import signals_to_thread
    from pcihole.machine.stop_request import StopRelay

    out_dir = _output_dir(args.out, "--out")
    stops = StopRelay()
    try:
        with signals_to_thread(lambda signum: stops.request(Stop(StopReason.SIGNAL, status=int(signum)))):
            status = run_bench(
                out_dir=out_dir, quick=args.quick, backends=args.backend, linux=args.linux, stops=stops
            )
    except Exception:
        _raise_if_signalled(stops.stop)  # the signal, not what it made fail, is the outcome
        raise
    _raise_if_signalled(stops.stop)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    verbose = False
    try:
        args = parser.parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="pcihole: %(message)s")
        command = {"run": cmd_run, "acpi": cmd_acpi, "linux": cmd_linux, "bench": cmd_bench}[args.command]
        return command(args)
    except UsageError as e:
        print(f"pcihole: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as e:
        print(f"pcihole: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Signalled as e:
        print(f"pcihole: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("pcihole: interrupted", file=sys.stderr)
        return EXIT_SIGNAL_BASE + signal.SIGINT
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as e:  # a bug or a failure nobody foresaw: still one line, never a traceback
        if verbose:
            traceback.print_exc()
        print(
            f"pcihole: error: internal error: {type(e).__name__}: {e} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
