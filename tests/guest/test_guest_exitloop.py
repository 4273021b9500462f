"""The scan guest's `pcihole.exitloop=N`: N timed reads of an absent function, a present one and RAM
after the scan, on pcihole (kvm and the model) and on QEMU. Counts only: the ticks are the bench's
(pcihole bench, "Exit cost, same guest"), never asserted here."""

from __future__ import annotations

import pytest

from pcihole.guest.report import ExitLoop, ScanStatus, parse_serial
from pcihole.machine.builder import build_machine, default_kernel
from pcihole.machine.dispatch import StopReason
from pcihole.machine.machinefile import load_default
from pcihole.pci.bdf import Bdf
from tests.backends import needs_kvm
from tests.guest.guest_qemu import SKIP_REASON, run

READS = 300
QUIET = "pcihole.quiet"
EXITLOOP = f"pcihole.exitloop={READS}"
#: q35's MMCONFIG (QEMU 7.2) and what its guest finds first: the MCH at 00:00.0, nothing at 00:01.0
Q35_ECAM = 0xB0000000


def ecam_address(base: int, bdf: Bdf) -> int:
    return base + (bdf.bus << 20 | bdf.devfn << 12)


def without_exitloop_line(serial: str) -> list[str]:
    return [line for line in serial.splitlines() if not line.startswith("pcihole-scan: exitloop ")]


def boot(backend: str, strategy: str, cmdline: str):
    image, name = default_kernel()
    spec = load_default()
    with build_machine(
        spec, backend=backend, strategy=strategy, kernel=image, kernel_name=name, cmdline=cmdline
    ) as m:
        result = m.run(timeout=120)
    assert (result.stop.reason, result.stop.status) == (StopReason.DEBUG_EXIT, 0), result.stop
    return result


def first_absent_function(spec) -> Bdf:
    """What the guest's scan of bus 0 meets first with no function there (devices 0, 1, ... in turn)."""
    present = {f.bdf for f in spec.topology.functions()}
    return next(Bdf(0, 0, d, 0) for d in range(32) if Bdf(0, 0, d, 0) not in present)


def check_line(loop: ExitLoop | None, ecam_base: int, absent: Bdf) -> ExitLoop:
    assert loop is not None, "no exitloop line"
    assert loop.reads == READS
    assert loop.absent_addr == ecam_address(ecam_base, absent)
    assert loop.present_addr == ecam_address(ecam_base, Bdf(0, 0, 0, 0))  # the host bridge
    return loop


@pytest.mark.parametrize(
    ("backend", "strategy"),
    [
        pytest.param("kvm", "exit", marks=needs_kvm, id="kvm-exit"),
        pytest.param("kvm", "ro-filled", marks=needs_kvm, id="kvm-ro-filled"),
        pytest.param("model", "exit", id="model-exit"),
        pytest.param("model", "ro-filled", id="model-ro-filled"),
    ],
)
def test_the_exitloop_reads_exit_once_each_with_exit_and_never_from_a_hole(backend, strategy):
    plain = boot(backend, strategy, QUIET)
    timed = boot(backend, strategy, f"{QUIET} {EXITLOOP}")
    spec = load_default()
    segment = spec.topology.segments[0]
    absent = first_absent_function(spec)
    serial = parse_serial(timed.serial)
    loop = check_line(serial.exit_loop, segment.ecam_base, absent)
    assert parse_serial(plain.serial).exit_loop is None
    # The report and the done line are the scan's, as without the option (the loop's reads are not
    # config_reads): the output is the same but for the exitloop line.
    assert without_exitloop_line(timed.serial) == plain.serial.splitlines()
    assert [d.bdf for d in timed.devices] == [d.bdf for d in plain.devices]

    key = (loop.absent_addr, 4, "read")
    absent_exits = timed.stats.ecam_absent_accesses[key] - plain.stats.ecam_absent_accesses[key]
    # ECAM read exits at present functions: all ECAM read exits but those at absent ones
    present_exits = (timed.stats.ecam_reads - timed.stats.ecam_absent_exits) - (
        plain.stats.ecam_reads - plain.stats.ecam_absent_exits
    )
    if strategy == "exit":
        assert absent_exits == READS  # answered by the C loop on kvm, counted as Python counts
        assert present_exits == READS
        assert timed.stats.ecam_exits - plain.stats.ecam_exits == 2 * READS
    else:
        assert timed.stats.ecam_absent_accesses[key] == 0 and timed.stats.ecam_absent_exits == 0
        assert present_exits == 0  # the present function's page is a read-only mirror
        assert timed.stats.ecam_exits == plain.stats.ecam_exits == 0


@pytest.mark.qemu
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_the_exitloop_on_qemu_reads_q35s_host_bridge_and_its_first_empty_slot():
    rc_plain, plain = run("q35", [], append=QUIET)
    rc, timed = run("q35", [], append=f"{QUIET} {EXITLOOP}")
    assert rc == rc_plain == 1, timed  # isa-debug-exit: (status 0 << 1) | 1
    check_line(parse_serial(timed).exit_loop, Q35_ECAM, Bdf(0, 0, 1, 0))
    assert parse_serial(plain).exit_loop is None
    assert without_exitloop_line(timed) == plain.splitlines()


@pytest.mark.parametrize("option", ["pcihole.exitloop=0", "pcihole.exitloop=", "pcihole.exitloop=x1"])
def test_a_bad_exitloop_option_is_reported_and_no_loop_runs(option):
    image, name = default_kernel()
    spec = load_default()
    with build_machine(
        spec,
        backend="model",
        strategy="ro-filled",
        kernel=image,
        kernel_name=name,
        cmdline=f"{QUIET} {option}",
    ) as m:
        result = m.run(timeout=60)
    serial = parse_serial(result.serial)
    assert result.stop.status == serial.status == ScanStatus.BAD_OPTION  # and the scan ran in full:
    assert serial.exit_loop is None and serial.ndevices == len(list(spec.topology.functions()))
