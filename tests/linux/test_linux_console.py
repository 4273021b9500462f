"""parse_linux_console on consoles captured from real boots of the Debian cloud kernel (6.1.0-57) with
pcihole's initramfs on QEMU 7.2 TCG (`-M q35 -accel tcg -m 256 -no-reboot -kernel vmlinux -initrd ...
-append "console=ttyS0 panic=-1"`):

- qemu-q35.txt: -nographic (SeaBIOS's escape sequences included), q35's own functions + VGA + e1000;
- qemu-q35-pxb.txt: -nodefaults plus a pxb-pcie host bridge (buses 0x40-), root ports (one
  multi-function pair), NVMe, virtio-net, virtio-rng; kernel messages land inside /init's block;
- qemu-q35-no-initrd.txt: no -initrd: the kernel panics (no root fs) after enumerating PCI;

and from pcihole itself: pcihole-kvm-pvm-default.txt, `pcihole run --linux --backend kvm --strategy
ro-alias` on the default machine on a software KVM (PVM, host quirks on), cut by the run's timeout
after the PCI scan, before /init.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pcihole.guest.report import ScannedDevice
from pcihole.linux.console import KERNEL_RUN_INIT, BootClock, LinuxDevice, parse_linux_console
from pcihole.linux.initramfs import PCI_BEGIN, PCI_LINE
from pcihole.machine.machine import device_json
from pcihole.machine.machinefile import load_default

CONSOLES = Path(__file__).parent / "consoles"


def console(name: str) -> str:
    return (CONSOLES / name).read_text(errors="replace")


def key(d: LinuxDevice) -> tuple:
    return (d.bdf, d.vendor, d.device, d.class_code, d.header_type)


@pytest.mark.parametrize("name", ["qemu-q35.txt", "qemu-q35-pxb.txt"])
def test_the_initramfs_block_is_the_source_and_agrees_with_the_kernel_lines(name):
    text = console(name)
    report = parse_linux_console(text)
    assert report.source == "initramfs"
    assert report.reached_init and report.powered_off and report.panic is None
    # As many functions as /init printed lines (counted independently of the parser's regexes).
    printed = [ln for ln in text.splitlines() if ln.startswith(PCI_LINE) and ln.count(":") == 3]
    assert len(report.devices) == len(printed) > 0
    assert [key(d) for d in report.devices] == [key(d) for d in report.kernel_devices]
    assert report.init_kernel_seconds is not None and report.init_kernel_seconds > 0
    assert any("MMCONFIG" in line for line in report.mcfg_lines)


def test_q35_functions_and_header_bits():
    report = parse_linux_console(console("qemu-q35.txt"))
    by_bdf = {d.bdf: d for d in report.devices}
    host = by_bdf["0000:00:00.0"]
    assert (host.vendor, host.device, host.class_code, host.header_type) == (0x8086, 0x29C0, 0x060000, 0)
    # ICH9's functions at 00:1f are one multi-function device: bit 7 of function 0's header type.
    assert by_bdf["0000:00:1f.0"].multifunction is True
    assert by_bdf["0000:00:00.0"].multifunction is False
    assert by_bdf["0000:00:1f.2"].class_code == 0x010601  # AHCI: the programming interface is kept


def test_functions_behind_bridges_and_a_second_host_bridge():
    report = parse_linux_console(console("qemu-q35-pxb.txt"))
    bridges = [d for d in report.devices if d.header_type == 1]
    assert {d.bdf for d in bridges} >= {"0000:00:03.0", "0000:00:03.1", "0000:40:00.0"}
    assert {d.address.bus for d in report.devices} == {0x00, 0x01, 0x02, 0x40, 0x41}


def test_without_init_the_kernel_lines_are_linux_answer():
    """Where user space does not run (a console cut where the kernel starts /init), the kernel's own
    enumeration lines are the list, and they equal what /init would have printed."""
    text = console("qemu-q35-pxb.txt")
    cut = text[: text.index(KERNEL_RUN_INIT)]
    full = parse_linux_console(text)
    report = parse_linux_console(cut)
    assert report.source == "kernel"
    assert not report.reached_init and not report.powered_off
    assert [key(d) for d in report.devices] == [key(d) for d in full.devices]
    assert all(d.multifunction is None for d in report.devices)  # the kernel line does not say
    assert any("MMCONFIG for domain 0000" in line for line in report.mcfg_lines)


def test_pcihole_console_lists_the_default_machine():
    report = parse_linux_console(console("pcihole-kvm-pvm-default.txt"))
    assert report.source == "kernel" and not report.reached_init
    machine = sorted(
        (str(f.bdf), f.vendor, f.device, f.class_code) for f in load_default().topology.functions()
    )
    assert sorted((d.bdf, d.vendor, d.device, d.class_code) for d in report.devices) == machine
    # The early MMCONFIG pass fails without conf1, the late one is accepted through the PNP0C02 _CRS.
    assert any("reserved in ACPI motherboard resources" in line for line in report.mcfg_lines)


def test_a_spoiled_block_falls_back_to_the_kernel_lines():
    text = console("qemu-q35.txt")
    line = next(ln for ln in text.splitlines() if ln.startswith(PCI_LINE + "0000:00:01.0"))
    spoiled = text.replace(line, line[:25] + "[    1.5] printk in the middle" + line[25:])
    report = parse_linux_console(spoiled)
    assert report.source == "kernel"  # the end marker's count no longer matches the lines read
    assert len(report.devices) == len(parse_linux_console(text).devices)


def test_a_block_without_its_end_marker_is_not_trusted():
    text = console("qemu-q35.txt")
    cut = text[: text.index(PCI_LINE + "0000:00:1f.2")]
    assert PCI_BEGIN in cut
    report = parse_linux_console(cut)
    assert report.source == "kernel" and report.reached_init


def test_a_panic_is_reported():
    report = parse_linux_console(console("qemu-q35-no-initrd.txt"))
    assert report.panic is not None and "Unable to mount root fs" in report.panic
    assert report.source == "kernel" and report.devices
    assert not report.reached_init and not report.powered_off


def test_nothing_found():
    report = parse_linux_console("SeaBIOS\r\nbooting\r\n")
    assert (report.source, report.devices, report.reached_init, report.powered_off) == (
        "none",
        [],
        False,
        False,
    )


def test_json_keys_are_the_scan_guests():
    d = parse_linux_console(console("qemu-q35.txt")).devices[0]
    scanned = ScannedDevice(d.address, d.vendor, d.device, d.class_code, 0, d.header_type or 0, False)
    assert device_json(d) == device_json(scanned)


def test_boot_clock_notes_init_across_chunks():
    ticks = iter(range(100))
    clock = BootClock(clock=lambda: float(next(ticks)))  # start = 0
    line = f"[    1.592156] {KERNEL_RUN_INIT}\r\n".encode()
    clock(b"early boot\r\n" + line[:10])
    assert clock.boot_seconds is None
    clock(line[10:])  # the line completes here: the clock reads 1
    assert clock.boot_seconds == 1.0
    clock(b"later\n")
    assert clock.boot_seconds == 1.0 and clock.text().endswith("later\n")


def test_other_segments_and_later_kernels_lines():
    """Segments other than 0 (a pcihole machine with several host bridges) and the suffix 6.6+ kernels
    add to the enumeration line (drivers/pci/probe.c: "... class %#08x %s", the port type)."""
    text = "\n".join(
        [
            "[  209.1] pci 0002:80:00.0: [1b36:0008] type 00 class 0x060000 conventional PCI endpoint",
            "[  209.2] pci 0002:80:01.0: [1b36:000c] type 01 class 0x060400 PCIe Root Port",
            "[  209.3] pci 0001:00:00.0: [8086:29c0] type 00 class 0x060000",
        ]
    )
    report = parse_linux_console(text)
    assert report.source == "kernel"
    assert [(d.bdf, d.header_type, d.class_code) for d in report.devices] == [
        ("0001:00:00.0", 0, 0x060000),
        ("0002:80:00.0", 0, 0x060000),
        ("0002:80:01.0", 1, 0x060400),
    ]
