"""QEMU TCG as the peer: the Debian kernel with pcihole's initramfs boots on q35, and what
parse_linux_console reads from the console equals what QEMU itself says the machine has (QMP query-pci)."""

from __future__ import annotations

import pytest

from pcihole.linux.cmdline import kernel_cmdline
from pcihole.linux.console import parse_linux_console
from tests.linux.linux_qemu_boot import LinuxOnQemu, linux_files, needs_qemu, query_pci_functions

pytestmark = needs_qemu

#: q35 plus a second host bridge (pxb-pcie, buses from 0x40) with a root port and a device behind it,
#: a multi-function pair of root ports on the main bridge with an NVMe disk and a virtio-net NIC.
EXTRA_DEVICES = [
    "-device", "pxb-pcie,id=pxb1,bus_nr=0x40,bus=pcie.0",
    "-device", "pcie-root-port,id=rpx,bus=pxb1,chassis=1,slot=1",
    "-device", "virtio-rng-pci,bus=rpx",
    "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=2,slot=2,addr=0x3.0,multifunction=on",
    "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=3,slot=3,addr=0x3.1",
    "-blockdev", "driver=null-co,node-name=blk0",
    "-device", "nvme,drive=blk0,serial=pcihole0,bus=rp0",
    "-device", "virtio-net-pci,bus=rp1",
]  # fmt: skip


@pytest.mark.parametrize("devices", [[], EXTRA_DEVICES], ids=["q35", "q35-pxb-root-ports"])
def test_linux_lists_what_qemu_has(tmp_path, devices):
    vmlinux, initrd = linux_files(tmp_path)
    with LinuxOnQemu(vmlinux, initrd, kernel_cmdline(), devices) as vm:
        console = vm.wait_powered_off()
        qemu_says = query_pci_functions(vm.qmp("query-pci"))
    report = parse_linux_console(console)
    assert report.source == "initramfs", console[-3000:]
    assert report.reached_init and report.powered_off
    linux_says = sorted((d.bdf, d.vendor, d.device, d.class_code >> 8, d.header_type) for d in report.devices)
    assert linux_says == qemu_says
    # The kernel's own enumeration lines list the same functions as /init's sysfs walk.
    assert [(d.bdf, d.vendor, d.device) for d in report.kernel_devices] == [
        (d.bdf, d.vendor, d.device) for d in report.devices
    ]
    # Linux found q35's ECAM through MCFG.
    assert any("MMCONFIG for domain 0000" in line for line in report.mcfg_lines), report.mcfg_lines
    if devices:
        assert any(d.address.bus == 0x41 for d in report.devices), "nothing behind the second host bridge"
        multi = {d.bdf: d.multifunction for d in report.devices}
        assert multi["0000:00:03.0"] is True and multi["0000:00:03.1"] is False
