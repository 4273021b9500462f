"""Full boots of an unmodified Debian cloud kernel: on kvm (ro-alias) and on the model (native: the
PCI holes are the seed's KVM_MEM_PCI_HOLE slots), the functions Linux's PCI core enumerates through
MCFG are exactly the machine file's and no ECAM read of an absent function exits; on kvm with `exit`
on a multi-segment machine, the absent-function exits are exactly the probes Linux's source says it
makes (tests/linux/linux_probes.py), address by address.

Where user space cannot run (this host's software KVM faults on the first syscall), the kernel's own
enumeration lines are Linux's answer (`pci 0000:00:02.0: [1b36:000c] type 01 class 0x060400`); the
run stops once the kernel has finished with PCI (`PCI: CLS ...`, printed by pci_apply_final_quirks()
after the resource assignment and the peer-bus scan), or when /init powers off where it can run. On
the model user space runs (SYSCALL is delivered): the run goes on to /init's power-off and the list
is the one /init read from sysfs.
The kernel and busybox come from `pcihole linux fetch` (apt-get download, cached), the initramfs from
pcihole.linux.initramfs. Each boot runs in the background from the start of the session
(tests/linux/boot_pool.py); its test, run last, checks it.
"""

from __future__ import annotations

import re

import pytest

from pcihole.linux.console import parse_linux_console
from pcihole.machine.dispatch import StopReason
from pcihole.machine.machinefile import load
from pcihole.machine.serial import COM1_BASE
from tests.examples import EXAMPLES
from tests.linux.boot_pool import LinuxBoot
from tests.linux.linux_probes import predicted_absent_probes

pytestmark = [pytest.mark.slow]

PCI_LINE = re.compile(
    r"^\[[ \d.]+\] pci ([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]): \[([0-9a-f]{4}):([0-9a-f]{4})\] "
    r"type ([0-9a-f]{2}) class (0x[0-9a-f]{6})",
    re.M,
)
COM1_THR = COM1_BASE
MANY_SEGMENTS = EXAMPLES / "many-segments.toml"

DEFAULT_ON_KVM = LinuxBoot("default", "kvm", "ro-alias")
MANY_SEGMENTS_ON_KVM = LinuxBoot("many-segments", "kvm", "exit")
MANY_SEGMENTS_ON_THE_MODEL = LinuxBoot("many-segments", "model", "native", until=None)


def kernel_devices(console: str) -> set[tuple[str, int, int, int, int]]:
    return {
        (bdf, int(vendor, 16), int(device, 16), int(cls, 16), int(header, 16))
        for bdf, vendor, device, header, cls in PCI_LINE.findall(console)
    }


@pytest.mark.kvm
@pytest.mark.linux_boot(DEFAULT_ON_KVM)
def test_linux_enumerates_the_machines_functions_through_mcfg_with_no_absent_exit(linux_boot):
    result = linux_boot.run()
    console = result.serial
    # Linux accepted the MCFG in its late pass, because MBRD's _CRS covers ECAM (no conf1 here).
    assert "PCI: MMCONFIG at [mem 0xe0000000-0xefffffff] reserved in ACPI motherboard resources" in console
    assert "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])" in console
    # The kernel prints the header type without the multi-function bit (pci_setup_device: hdr_type & 0x7f).
    expected = {
        (str(d.bdf), d.vendor, d.device, d.class_code, d.header_type & 0x7F) for d in result.machine_devices
    }
    assert kernel_devices(console) == expected
    # Every BAR got an address from the host bridge windows.
    assert not re.search(r"no space for|failed to assign|can't claim", console), console
    # ro-alias: the peer-bus brute force and every other absent probe read the alias, no exit.
    assert result.stats.ecam_absent_exits == 0
    assert result.stats.ecam_exits > 0  # Linux's config writes to present functions do exit
    # The console: printk's LSR polls exit, its THR writes do not (the ring is drained at each poll).
    # Until the PCI core is done only printk touches port 0x3f8 (the 8250 driver's startup, which
    # reads RBR, comes with user space).
    assert result.stats.io_coalesced_by_port[COM1_THR] > 0
    if result.stop.reason == StopReason.SERIAL_MATCH:
        assert result.stats.io_by_port[COM1_THR] == 0
    print(
        f"host-quirk fix-ups {dict(result.stats.quirk_fixups_by_kind)}, "
        f"port exits {dict(result.stats.io_by_port.most_common(6))}, "
        f"coalesced port writes {dict(result.stats.io_coalesced_by_port)}"
    )


@pytest.mark.kvm
@pytest.mark.linux_boot(MANY_SEGMENTS_ON_KVM)
def test_linux_enumerates_every_segment_of_a_multi_segment_machine(linux_boot):
    """examples/many-segments.toml: five segments of different sizes, one whose first bus is 16, a
    conventional PCI-PCI bridge: Linux accepts every MCFG entry (a PNP0A08 with _SEG/_BBN each) and
    lists exactly the file's functions. With `exit` every ECAM access exits, so the exits at absent
    functions are Linux's probes of them: they must be exactly those its source makes (root-bus and
    bridge scans of every segment, only device 0 below a PCIe port, the peer-bus scan of segment 0's
    buses 5-63 with 16-bit reads), address by address, each once."""
    spec = load(MANY_SEGMENTS)
    assert any(s.start_bus != 0 for s in spec.segments)
    result = linux_boot.run()
    console = result.serial
    for s in spec.segments:  # acpi_pci_root_add: "PCI Root Bridge [%s] (domain %04x %pR)"
        assert re.search(
            rf"PCI Root Bridge \[\w+\] \(domain {s.id:04x} \[bus {s.start_bus:02x}-{s.end_bus:02x}\]\)",
            console,
        ), (s, console[-3000:])
    expected = {
        (str(d.bdf), d.vendor, d.device, d.class_code, d.header_type & 0x7F) for d in result.machine_devices
    }
    assert kernel_devices(console) == expected
    assert not re.search(r"no space for|failed to assign|can't claim", console), console
    predicted = predicted_absent_probes(spec.topology)
    measured = result.stats.ecam_absent_accesses
    missing, extra = predicted - measured, measured - predicted
    assert not missing and not extra, (
        f"{len(missing)} predicted probes not made, e.g. {sorted(missing)[:8]}; "
        f"{len(extra)} made but not predicted, e.g. {sorted(extra)[:8]}"
    )
    assert result.stats.ecam_absent_exits == predicted.total()
    print(
        f"absent-function exits predicted {predicted.total()}, "
        f"port exits {dict(result.stats.io_by_port.most_common(6))}"
    )


def initramfs_devices(result) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """(what /init listed from sysfs, the machine file's functions), both as sorted (BDF, vendor, device)."""
    report = parse_linux_console(result.serial)
    assert report.source == "initramfs", (report, result.serial[-3000:])
    found = sorted((d.bdf, d.vendor, d.device) for d in report.devices)
    return found, sorted((str(d.bdf), d.vendor, d.device) for d in result.machine_devices)


@pytest.mark.linux_boot(MANY_SEGMENTS_ON_THE_MODEL)
def test_linux_on_the_model_lists_every_segment_from_init_with_no_absent_exit(linux_boot):
    """The model backend, native strategy (every absent function's ECAM page a KVM_MEM_PCI_HOLE
    slot, the seed's ABI, which exists only in the model), on examples/many-segments.toml (five
    segments, one whose first bus is 16, a PCI-PCI bridge). User space runs on the model: /init lists
    sysfs and powers off; the list is the file's, every root bridge is found with its bus range, and
    no read of an absent function exits. (`pcihole run --linux --backend model` on the default
    machine is tests/linux/test_linux_cli.py's.)"""
    spec = load(MANY_SEGMENTS)
    result = linux_boot.run()
    assert result.stop.reason == StopReason.POWER_OFF, (result.stop, result.serial[-3000:])
    console = result.serial
    for s in spec.segments:
        assert re.search(
            rf"PCI Root Bridge \[\w+\] \(domain {s.id:04x} \[bus {s.start_bus:02x}-{s.end_bus:02x}\]\)",
            console,
        ), (s, console[-3000:])
    found, expected = initramfs_devices(result)
    assert found == expected
    assert not re.search(r"no space for|failed to assign|can't claim", console), console
    assert result.stats.ecam_absent_exits == 0
