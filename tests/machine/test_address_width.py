"""pcihole refuses a machine its vCPU cannot address, before any guest runs (machine/address_width.py,
QEMU's pc_memory_init "phys-bits too low"): every range it places must end at or below
2**MAXPHYADDR - 1, MAXPHYADDR being what the backend's CPUID leaf 0x80000008 says."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcihole.acpi import MmioWindow
from pcihole.acpi.window_plan import PlacedWindow
from pcihole.hv import open_backend
from pcihole.hv.cpu_setup import CPUID_1_EDX_PAE, CPUID_ADDRESS_SIZES, physical_address_bits
from pcihole.hv.model.cpuid import CpuidEntry, cpuid2_from
from pcihole.machine.address_width import beyond_width
from pcihole.machine.builder import MachineBuildError, acpi_tables, build_machine, default_kernel
from pcihole.machine.machinefile import load, loads
from tests.backends import BACKENDS
from tests.examples import EXAMPLES
from tests.reliability.test_cli_errors import pcihole

GPU_SERVER = EXAMPLES / "gpu-server.toml"
GiB = 1 << 30


def width_of(backend: str) -> int:
    hv = open_backend(backend)
    try:
        return physical_address_bits(hv.get_supported_cpuid())
    finally:
        hv.close()


# --- the rule, at the boundary ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 36, 40, 46, 48, 52])
def test_a_range_ending_exactly_at_2_to_the_n_passes_and_one_byte_more_is_refused(bits):
    top = 1 << bits
    fits = PlacedWindow("fits", MmioWindow(top - GiB, GiB))  # last byte 2**bits - 1
    over = PlacedWindow("one byte more", MmioWindow(top - GiB, GiB + 1))  # last byte 2**bits
    low = PlacedWindow("RAM", MmioWindow(0, 64 << 20))
    assert beyond_width([low, fits], bits) is None
    assert beyond_width([low, fits, over], bits) is over
    assert beyond_width([over], bits + 1) is None


def test_the_range_named_is_the_one_that_ends_highest():
    a = PlacedWindow("a", MmioWindow(1 << 41, 1 << 40))
    b = PlacedWindow("b", MmioWindow(1 << 42, 1 << 42))
    c = PlacedWindow("c", MmioWindow(1 << 40, 1 << 40))
    assert beyond_width([a, b, c], 40) is b


def test_the_width_is_cpuid_0x80000008_eax_bits_7_0_else_36_with_pae():
    leaf1 = CpuidEntry(1, 0, 0, 0, 0, 0, CPUID_1_EDX_PAE)
    sizes = CpuidEntry(CPUID_ADDRESS_SIZES, 0, 0, 0x3027, 0, 0, 0)  # 48 bits virtual, 39 physical
    assert physical_address_bits(cpuid2_from([leaf1, sizes])) == 39
    assert physical_address_bits(cpuid2_from([leaf1])) == 36
    assert physical_address_bits(cpuid2_from([CpuidEntry(1, 0, 0, 0, 0, 0, 0)])) == 32


# --- the windows checked ------------------------------------------------------------------------------


def test_every_window_the_tables_hand_out_is_checked_expanders_included():
    spec = load(EXAMPLES / "expander.toml")
    placed = acpi_tables(spec).placed_windows
    whats = [p.what for p in placed]
    assert "segment 0's ECAM window" in whats
    assert "segment 0's 32-bit MMIO window" in whats and "segment 0's 64-bit MMIO window" in whats
    assert "expander bus 0x80 (segment 0)'s 32-bit MMIO window" in whats
    assert "expander bus 0x80 (segment 0)'s 64-bit MMIO window" in whats
    # The expander's blocks are carved from the segment's windows: they and what PCI0 keeps tile it.
    mem64 = sorted((p.window for p in placed if "64-bit" in p.what), key=lambda w: w.base)
    assert all(a.last + 1 == b.base for a, b in zip(mem64, mem64[1:], strict=False))


def one_big_bar(bar_size: int) -> str:
    """A machine whose 64-bit window holds a `bar_size` BAR below a root port (which adds 2 MiB of
    hot-plug room: pci/bridge_windows.py), in the naturally aligned block of the next power of two."""
    return f"""
[machine]
ram_mib = 16
[[segment]]
id = 0
ecam_base = 0xe0000000
buses = "0-15"
[[root_port]]
bdf = "0000:00:01.0"
secondary = 1
[[endpoint]]
bdf = "0000:01:00.0"
vendor = 0x10de
device = 0x20b5
class = 0x030200
[[endpoint.bar]]
index = 0
type = "mem64"
size = {bar_size:#x}
prefetchable = true
"""


def mem64_window(text: str) -> MmioWindow:
    (window,) = [p.window for p in acpi_tables(loads(text)).placed_windows if "64-bit" in p.what]
    return window


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_ending_at_the_cpus_width_builds_and_one_beyond_is_refused(backend):
    bits = width_of(backend)
    image, name = default_kernel()
    # A quarter of the address space and the port's room: the block [2**(bits-1), 2**bits - 1].
    top = one_big_bar(1 << (bits - 2))
    assert mem64_window(top).last == (1 << bits) - 1
    with build_machine(loads(top, "top.toml"), backend=backend, kernel=image, kernel_name=name) as machine:
        assert machine.hv.name == backend
    # Half of it and the room: the block doubles, to [2**bits, 2**(bits+1) - 1].
    over = one_big_bar(1 << (bits - 1))
    assert mem64_window(over).base == 1 << bits
    with pytest.raises(MachineBuildError) as refused:
        build_machine(loads(over, "over.toml"), backend=backend, kernel=image, kernel_name=name)
    assert str(refused.value) == (
        f"over.toml: segment 0's 64-bit MMIO window at {1 << bits:#x} ends at {(2 << bits) - 1:#x}, "
        f"beyond the {backend} CPU's {bits} physical address bits"
    )


# --- the command line ---------------------------------------------------------------------------------


def refusal(path: Path, backend: str) -> str:
    """The line pcihole prints for gpu-server on `backend`: its 64-bit window, 2 TiB for eight 128 GiB
    BARs, is the range that ends highest."""
    window = next(
        p.window for p in acpi_tables(load(path)).placed_windows if p.what.endswith("64-bit MMIO window")
    )
    return (
        f"pcihole: error: {path}: segment 0's 64-bit MMIO window at {window.base:#x} ends at {window.last:#x}, "
        f"beyond the {backend} CPU's {width_of(backend)} physical address bits"
    )


def test_run_refuses_the_gpu_server_on_the_model_with_one_line_and_exit_2():
    """Linux on the model would ignore gpu-server's 64-bit window ("host bridge window ... (ignored,
    not CPU addressable)") and its GPUs' 128 GiB BARs would get no address: pcihole says so first."""
    assert width_of("model") < 42  # the window ends at 4 TiB
    for how in (["--linux"], ["--json"], []):
        proc = pcihole("run", "--machine", str(GPU_SERVER), "--backend", "model", *how)
        assert (proc.returncode, proc.stdout) == (2, "")
        assert proc.stderr.splitlines() == [refusal(GPU_SERVER, "model")], how


def test_acpi_writes_the_gpu_servers_tables_it_has_no_cpu(tmp_path):
    proc = pcihole("acpi", "--machine", str(GPU_SERVER), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "DSDT.dat").stat().st_size > 0


def test_bench_refuses_a_machine_before_it_measures_anything(tmp_path, monkeypatch, capsys):
    """The bench's machines are its own (the default machine and the scaling ones) and fit both
    backends; given gpu-server as its default machine, it refuses it on the model before any run."""
    import pcihole.bench.runner
    from pcihole.cli import main

    monkeypatch.setattr(pcihole.bench.runner, "load_default", lambda: load(GPU_SERVER))
    assert main(["bench", "--quick", "--backend", "model", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [refusal(GPU_SERVER, "model")]
    assert list(tmp_path.iterdir()) == []
