"""Linux boots the example fabrics: examples/gpu-server.toml (two switches, eight
GPUs with 128 GiB BARs, NVMe) and examples/expander.toml (a pxb-pcie expander bus with a switch, a
conventional PCI-PCI bridge). For each: the functions Linux's PCI core enumerates are exactly the
file's, every host bridge's _OSC hands Linux the native PCIe features, every BAR and bridge window
gets an address (the expander's from its own _CRS windows), and no ECAM read of an absent function
exits. The console's helpers are test_linux_boot.py's.

Each example boots on the model (native: the absent functions are the seed's KVM_MEM_PCI_HOLE slots),
where the kernel runs on to /init and its power-off in seconds (the patched engine), and on kvm
(ro-alias) to the end of PCI enumeration, which on this project's software-KVM hosts takes about 5
minutes of CPU. The boots run in the background from the start of the session, several at once (tests/linux/boot_pool.py);
each test, run last, checks its own.
"""

from __future__ import annotations

import re

import pytest

from pcihole.machine.dispatch import StopReason
from tests.linux.boot_pool import LinuxBoot
from tests.linux.test_linux_boot import initramfs_devices, kernel_devices

pytestmark = [pytest.mark.slow]


def boots(machine: str) -> list:
    """The machine on the model (native, to /init's list and power-off) and on kvm (ro-alias, to the
    end of PCI enumeration), as parameters naming their boot."""
    on_the_model = LinuxBoot(machine, "model", "native", until=None)
    on_kvm = LinuxBoot(machine, "kvm", "ro-alias")
    return [
        pytest.param(on_the_model, id="model-native", marks=pytest.mark.linux_boot(on_the_model)),
        pytest.param(on_kvm, id="kvm-ro-alias", marks=[pytest.mark.kvm, pytest.mark.linux_boot(on_kvm)]),
    ]


#: Linux's messages when a BAR or a bridge window finds no room (pci_assign_resource, __assign_resources_sorted,
#: pci_claim_resource) and when a host bridge window is dropped (acpi_pci_root_validate_resources).
BAR_ERRORS = re.compile(
    r"no space for|failed to assign|can't claim|can't assign|ignored, not CPU addressable|conflicts"
)
#: acpi_pci_root_add() -> negotiate_os_control(): what the OS controls after _OSC.
OS_CONTROLS = re.compile(r"acpi (PNP0A08:[0-9a-f]{2}): _OSC: OS now controls \[([^\]]*)\]")
#: What pcihole's _OSC grants where there are hot-pluggable slots (acpi/pci_osc.py).
GRANTED = ["PCIeHotplug", "PME", "AER", "PCIeCapability"]


def check_common(result, console: str, bridges: list[str]) -> None:
    # Linux accepted the MCFG (MBRD reserves ECAM) and scanned every root bus the DSDT describes.
    assert "PCI: MMCONFIG at [mem 0xe0000000-0xefffffff] reserved in ACPI motherboard resources" in console
    for bridge in bridges:
        assert f"ACPI: PCI Root Bridge {bridge}" in console, (bridge, console[-3000:])
    # _OSC on every host bridge: Linux takes the native PCIe features, none is left to a platform
    # that has no firmware to handle them.
    controls = OS_CONTROLS.findall(console)
    assert len(controls) == len(bridges), console
    assert all(granted.split() == GRANTED for _, granted in controls), controls
    assert "platform retains control" not in console
    # The kernel prints the header type without the multi-function bit (pci_setup_device: hdr_type & 0x7f).
    expected = {
        (str(d.bdf), d.vendor, d.device, d.class_code, d.header_type & 0x7F) for d in result.machine_devices
    }
    assert kernel_devices(console) == expected
    # Every BAR and bridge window got an address from its root bus's windows.
    assert not BAR_ERRORS.search(console), [line for line in console.splitlines() if BAR_ERRORS.search(line)]
    # ro-alias / native: every absent probe (the peer-bus brute force included) reads the alias or
    # the PCI hole, no exit.
    assert result.stats.ecam_absent_exits == 0
    if result.stop.reason == StopReason.POWER_OFF:  # /init ran: its sysfs list is Linux's answer too
        found, machine = initramfs_devices(result)
        assert found == machine


#: On kvm only: its 64-bit window (eight 128 GiB BARs, at 2 TiB) lies beyond the model CPU's 40
#: physical address bits, and pcihole refuses it there before the kernel is fetched
#: (tests/machine/test_address_width.py checks the refusal).
GPU_SERVER_BOOTS = [boots("gpu-server")[1]]


@pytest.mark.parametrize("boot", GPU_SERVER_BOOTS)
def test_linux_enumerates_the_gpu_server_and_places_its_128_gib_bars(boot, linux_boot):
    result = linux_boot.run()
    console = result.serial
    check_common(result, console, ["[PCI0] (domain 0000 [bus 00-ff])"])
    # Each GPU's 128 GiB prefetchable BAR landed in the host bridge's 64-bit window, above 4 GiB.
    bars = re.findall(
        r"pci 0000:(0[3-6]|0[9a-c]):00\.0: BAR 1 \[mem (0x[0-9a-f]+)-0x[0-9a-f]+ 64bit pref\]: assigned",
        console,
    )
    assert len(bars) == 8, console[-5000:]
    assert all(int(start, 16) >= 1 << 32 for _, start in bars)


@pytest.mark.parametrize("boot", boots("expander"))
def test_linux_enumerates_the_expander_bus_and_assigns_its_bars_from_its_own_windows(boot, linux_boot):
    result = linux_boot.run()
    console = result.serial
    check_common(result, console, ["[PCI0] (domain 0000 [bus 00-7f])", "[X080] (domain 0000 [bus 80-8f])"])
    # The expander's root bus has its own windows (its _CRS), apart from PCI0's.
    windows = re.findall(r"pci_bus 0000:80: root bus resource \[(io|mem) ", console)
    assert windows.count("io") == 1 and windows.count("mem") == 2, console
    # Its NVMe drives' BARs were assigned (from those windows: a window of another root bus would be refused).
    for nvme in ("81:00.0", "84:00.0"):
        assert re.search(
            rf"pci 0000:{nvme}: BAR 0 \[mem 0x[0-9a-f]+-0x[0-9a-f]+ 64bit\]: assigned", console
        ), nvme
