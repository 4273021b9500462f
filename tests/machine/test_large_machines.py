"""Machines the adversarial pass found broken: many segments, many functions, a non-0xff fill, a memory
map too long for its page. Each runs a real guest on both backends and checks what it sees."""

from __future__ import annotations

import pytest

from pcihole.cli import EMBEDDED_GUEST_CMDLINE
from pcihole.machine.builder import build_machine, default_kernel, e820_map
from pcihole.machine.dispatch import StopReason
from pcihole.machine.machinefile import loads
from tests.backends import BACKENDS
from tests.guest_runner import pvh_kernel_from_asm

EXIT_0 = "mov $0, %al\nout %al, $0xf4\nhlt\n"


def one_bus_segments(n: int, *, endpoints_per_segment: int = 0, multifunction: bool = False) -> str:
    """`n` one-bus segments 2 MiB apart (so their E820 entries do not merge), with endpoints on bus 0."""
    text = "[machine]\nram_mib = 64\n"
    for s in range(n):
        text += f'[[segment]]\nid = {s}\necam_base = {0x80000000 + s * 0x200000:#x}\nbuses = "0-0"\n'
    for s in range(n):
        for d in range(1, 1 + endpoints_per_segment):
            for f in range(8 if multifunction else 1):
                text += (
                    f'[[endpoint]]\nbdf = "{s:04x}:00:{d:02x}.{f}"\nvendor = 0x1af4\n'
                    f"device = {0x1000 + f:#x}\nclass = 0x020000\n"
                )
    return text


def scan(toml: str, backend: str):
    spec = loads(toml, "<large.toml>")
    image, name = default_kernel()
    with build_machine(
        spec, backend=backend, strategy="auto", kernel=image, kernel_name=name, cmdline=EMBEDDED_GUEST_CMDLINE
    ) as m:
        result = m.run(timeout=300)
        expected = sorted((str(d.bdf), d.vendor, d.device) for d in m.host_bridge.devices())
    return result, expected


def check_full_report(result, expected) -> None:
    assert result.report is not None
    assert (result.stop.reason, result.stop.status, result.report.status) == (StopReason.DEBUG_EXIT, 0, 0)
    assert result.report.ndevices == len(expected)
    assert sorted((d.bdf, d.vendor, d.device) for d in result.report.devices) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_twenty_segments_are_all_scanned(backend):
    """The guest stopped at 8 MCFG regions (status region-skipped)."""
    result, expected = scan(one_bus_segments(20, endpoints_per_segment=1), backend)
    check_full_report(result, expected)
    assert len(result.report.regions) == 20
    assert len(expected) == 40  # a host bridge and an endpoint per segment


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_256_functions_are_all_reported(backend):
    """The guest's device list held 256 functions (status truncated)."""
    result, expected = scan(one_bus_segments(2, endpoints_per_segment=31, multifunction=True), backend)
    assert len(expected) == 2 * (1 + 31 * 8)
    check_full_report(result, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_ff_fill_gets_the_best_strategy_that_can_do_it(backend):
    """auto picked native on the model, which reads only 0xff, and the machine failed to build."""
    toml = "[machine]\nram_mib = 64\n[[segment]]\nid = 0\necam_base = 0xe0000000\nfill = 0x5a\n"
    # Read the hole at bus 1 (absent): status 0 if it reads as the fill, 1 if not.
    code = pvh_kernel_from_asm(
        "mov $0xe0100000, %esi\nmov (%esi), %eax\ncmp $0x5a5a5a5a, %eax\njne 1f\nmov $0, %al\nout %al, $0xf4\n"
        "hlt\n1: mov $1, %al\nout %al, $0xf4\nhlt\n"
    )
    spec = loads(toml, "<fill.toml>")
    with build_machine(spec, backend=backend, strategy="auto", kernel=code, kernel_name="k") as m:
        result = m.run(timeout=60)
    assert (result.stop.reason, result.stop.status) == (StopReason.DEBUG_EXIT, 0)
    assert result.strategy == "ro-alias"
    # With the fill every strategy does, auto still takes the best.
    spec = loads(toml.replace("0x5a", "0xff"), "<fill.toml>")
    with build_machine(spec, backend=backend, strategy="auto", kernel=code, kernel_name="k") as m:
        best = m.memory.strategy.name
    assert best == ("native" if backend == "model" else "ro-alias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_memory_map_is_not_overwritten_by_the_boot_stack(backend):
    """400 one-bus segments: 404 E820 entries spilled past the start-info page into the boot stack, so a
    guest's first pushes overwrote the memory map it had not read yet."""
    from pcihole.boot.pvh import HVM_MEMMAP_ENTRY, HVM_START_INFO
    from pcihole.machine import layout

    code = pvh_kernel_from_asm("mov $64, %ecx\n1: push $0xdeadbeef\nloop 1b\n" + EXIT_0)
    spec = loads(one_bus_segments(400), "<memmap.toml>")
    with build_machine(spec, backend=backend, strategy="exit", kernel=code, kernel_name="k") as m:
        result = m.run(timeout=60)
        info = HVM_START_INFO.unpack(m.memory.read_guest(layout.START_INFO_GPA, HVM_START_INFO.size))
        memmap_paddr, entries = info[7], info[8]
        table = m.memory.read_guest(memmap_paddr, entries * HVM_MEMMAP_ENTRY.size)
        expected = e820_map(spec.ram_bytes, m.host_bridge)
    assert (result.stop.reason, result.stop.status) == (StopReason.DEBUG_EXIT, 0)
    assert entries == len(expected) == 404
    got = [HVM_MEMMAP_ENTRY.unpack_from(table, i * HVM_MEMMAP_ENTRY.size)[:3] for i in range(entries)]
    assert got == [(e.addr, e.size, e.type) for e in expected]
