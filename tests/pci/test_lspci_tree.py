"""`pcihole run --tree`: the tree as lspci -t prints it, checked against the real lspci reading the
same registers, and the bridges' registers as lspci -vv decodes them (what a kernel reads too)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pcihole.machine.machinefile import load, load_default
from pcihole.pci.host_bridge import HostBridge
from pcihole.pci.lspci_tree import TreeDevice, lspci_tree, tree_devices
from pcihole.pci.topology import EndpointSpec
from tests.pci.lspci_dump import lspci, needs_lspci, write_dump
from tests.pci.pci_test_machines import bdf

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MACHINES = {p.stem: p for p in sorted(EXAMPLES.glob("*.toml"))}


def machine(name: str) -> HostBridge:
    return HostBridge((load_default() if name == "default" else load(MACHINES[name])).topology)


def test_a_switch_below_a_root_port_and_a_bridge_on_the_root_bus():
    def fn(bus, dev, fun=0, cls=0x020000, sec=0, sub=0):
        return TreeDevice(0, bus, dev, fun, cls, 1 if sec else 0, sec, sub)

    devices = [
        fn(0, 0, cls=0x060000),
        fn(0, 1, cls=0x060400, sec=1, sub=4),
        fn(1, 0, cls=0x060400, sec=2, sub=4),
        fn(2, 0, cls=0x060400, sec=3, sub=3),
        fn(2, 1, cls=0x060400, sec=4, sub=4),
        fn(3, 0),
        fn(3, 0, 1),
        fn(0, 5, cls=0x060400, sec=5, sub=5),
        fn(5, 0x1F),
    ]
    assert lspci_tree(reversed(devices)) == (
        "-[0000:00]-+-00.0\n"
        "           +-01.0-[01-04]----00.0-[02-04]--+-00.0-[03]--+-00.0\n"
        "           |                               |            \\-00.1\n"
        "           |                               \\-01.0-[04]--\n"
        "           \\-05.0-[05]----1f.0\n"
    )


@needs_lspci
@pytest.mark.parametrize("name", [*MACHINES, "default"])
def test_the_tree_is_lspcis(tmp_path, name):
    bridge = machine(name)
    assert lspci_tree(tree_devices(bridge)) == lspci(write_dump(bridge, tmp_path / "dump"), "-t")


@needs_lspci
def test_the_tree_follows_hotplug_below_a_downstream_port(tmp_path):
    bridge = machine("gpu-server")
    bridge.remove_function(bdf("0000:04:00.0"))
    bridge.add_function(EndpointSpec(bdf("0000:0a:00.1"), 0x10DE, 0x22BA, 0x040300))  # the GPU's audio
    tree = lspci_tree(tree_devices(bridge))
    assert "+-01.0-[04]--\n" in tree and "+-01.0-[0a]--+-00.0\n" in tree
    assert tree == lspci(write_dump(bridge, tmp_path / "dump"), "-t")


def lspci_vv(bridge: HostBridge, tmp_path: Path, address: str) -> str:
    return lspci(write_dump(bridge, tmp_path / "dump"), "-vv", "-s", address)


@needs_lspci
@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("00:01.0", ["Express (v2) Root Port (Slot+)", "Bus: primary=00, secondary=01, subordinate=06"]),
        ("01:00.0", ["XIO3130 PCI Express Switch (Upstream) (rev 02)", "Express (v2) Upstream Port,",
                     "Bus: primary=01, secondary=02, subordinate=06", "Advanced Error Reporting"]),
        ("02:03.0", ["XIO3130 PCI Express Switch (Downstream) (rev 01)", "Express (v2) Downstream Port (Slot+)",
                     "Bus: primary=02, secondary=06, subordinate=06", "HotPlug+ Surprise+", "Slot #6,",
                     "PresDet+", "DLActive+", "Advanced Error Reporting"]),
        ("06:00.0", ["3D controller", "Express (v2) Endpoint,"]),
        ("00:02.1", ["Express (v2) Root Port (Slot+)", "PresDet-", "DLActive-"]),  # the free slot
    ],
)  # fmt: skip
def test_switch_registers_as_lspci_decodes_them(tmp_path, address, expected):
    text = lspci_vv(machine("gpu-server"), tmp_path, address)
    for words in expected:
        assert words in text, f"{words!r} not in:\n{text}"


@needs_lspci
def test_pci_bridge_and_expander_registers_as_lspci_decodes_them(tmp_path):
    bridge = machine("expander")
    pci_bridge = lspci_vv(bridge, tmp_path, "00:05.0")
    assert "QEMU PCI-PCI bridge" in pci_bridge and "Express" not in pci_bridge
    assert "Capabilities: [40] Slot ID: 0 slots, First+, chassis 01" in pci_bridge
    assert "Bus: primary=00, secondary=02, subordinate=02" in pci_bridge
    conventional = lspci_vv(bridge, tmp_path, "02:1f.0")
    assert "Express" not in conventional and "Capabilities" not in conventional
    expander = lspci_vv(bridge, tmp_path, "00:10.0")
    assert re.search(r"Host bridge: Red Hat, Inc\. QEMU PCIe Expander bridge", expander), expander
    port = lspci_vv(bridge, tmp_path, "80:01.0")
    assert "Bus: primary=80, secondary=82, subordinate=84" in port
