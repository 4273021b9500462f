"""The Linux-boot table of `pcihole bench --linux`: its QEMU TCG peer row boots the fetched kernel with
pcihole's initramfs on the default machine's devices and checks Linux's list; the table and the JSON
carry the rows and say what was left out. (The kvm rows take minutes each on a software KVM, and the
model's row is tests/linux/test_linux_boot.py's boot: they run in `pcihole bench --linux`, not here.)"""

from __future__ import annotations

import shutil

import pytest

from pcihole.bench.configs import Configs
from pcihole.bench.errors import BenchError
from pcihole.bench.host import host_info
from pcihole.bench.linux_boot import LinuxBootRow, linux_files, measure_linux, with_linux_ram
from pcihole.bench.plan import QUICK
from pcihole.bench.report import linux_table
from pcihole.bench.results import BenchResults
from pcihole.host.tsc import TscClock, TscUnknown, tsc_clock
from pcihole.linux import MIN_RAM_MIB
from pcihole.machine.machinefile import load_default


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not found")
def test_the_qemu_tcg_row_and_the_table():
    try:
        files = linux_files()
    except BenchError as e:
        pytest.skip(f"the Debian kernel cannot be fetched here: {e}")
    spec = load_default()
    # No pcihole configuration: the peer's row only (QEMU with KVM is skipped, with the reason).
    rows, skipped = measure_linux(spec, [], hardware_kvm=False, files=files)
    assert [r.label for r in rows] == ["qemu tcg"], skipped
    qemu = rows[0]
    assert qemu.source == "initramfs" and qemu.powered_off and qemu.ended == "power-off"
    assert qemu.devices == len(list(spec.topology.functions()))  # and measure_linux checked each of them
    assert qemu.boot_seconds is not None and 0 < qemu.boot_seconds <= qemu.run_seconds
    assert list(skipped) == ["qemu kvm"]

    try:
        clock = tsc_clock()
    except TscUnknown as e:
        pytest.skip(f"no TSC frequency for BenchResults: {e}")
    results = BenchResults(QUICK, host_info(), clock, Configs(), "now", linux_measured=True)
    results.linux, results.linux_skipped = rows, skipped
    table = "\n".join(linux_table(results))
    assert "| qemu tcg |" in table and "no `qemu kvm` row" in table
    data = results.as_json()["linux"]
    assert data["measured"] and data["rows"][0]["label"] == "qemu tcg"


def test_linux_gets_enough_ram():
    spec = load_default()
    assert with_linux_ram(spec).ram_mib == max(spec.ram_mib, MIN_RAM_MIB)
    assert with_linux_ram(with_linux_ram(spec)) == with_linux_ram(spec)


def test_the_table_says_how_many_exits_were_the_console():
    """COM1 is ports 0x3f8-0x3ff: its exits are summed from the row's exits per port, the rest left out."""
    row = LinuxBootRow(
        backend="kvm",
        strategy="exit",
        boot_seconds=None,
        run_seconds=1.0,
        exits={"mmio_read": 1, "mmio_write": 0, "io": 1237, "total": 1238},
        ecam_reads=1,
        absent_exits=0,
        devices=1,
        source="kernel",
        powered_off=False,
        ended="serial-match",
        io_by_port={"0x3f8": 600, "0x3fd": 601, "0x3f9": 20, "0x3ff": 1, "0x3f7": 5, "0xcf8": 10},
    )
    results = BenchResults(
        QUICK, host_info(), TscClock(1e9, "cpuinfo", None), Configs(), "now", linux_measured=True
    )
    results.linux = [row]
    (line,) = [line for line in linux_table(results) if line.startswith("| kvm / exit |")]
    assert line.split(" | ")[4] == "1,222"  # 600 + 601 + 20 + 1: not 0x3f7 nor 0xcf8


def test_the_table_puts_the_model_against_qemu_tcg_with_its_engine():
    """Each model row's boot to /init over QEMU TCG's in the same run, and the engine it ran on."""

    def row(backend: str, strategy: str, boot: float | None) -> LinuxBootRow:
        return LinuxBootRow(backend, strategy, boot, 10.0, None, None, None, 1, "initramfs", True)

    results = BenchResults(
        QUICK, host_info(), TscClock(1e9, "cpuinfo", None), Configs(), "now", linux_measured=True
    )
    results.linux = [row("model", "native", 6.0), row("model", "exit", None), row("qemu", "tcg", 2.4)]
    notes = [line for line in linux_table(results) if "QEMU TCG's" in line]
    assert notes == [
        f"- `model / native` to /init: 2.5x QEMU TCG's (target 3x) (engine: {host_info().model_engine})"
    ]
    assert "Unicorn" in (host_info().model_engine or "")
