"""The scan guest boots unchanged on QEMU (PVH via -kernel, KVM) and sees what QEMU says is there."""

from __future__ import annotations

import pytest

from pcihole.guest.report import ScannedDevice, ScanStatus, parse_serial, read_report
from tests.guest import guest_qemu
from tests.guest.guest_qemu import Session, flatten_query_pci, needs_qemu, run


def bus_slot_function(d: ScannedDevice) -> tuple[int, int, int]:
    """As QEMU's query-pci names a function."""
    return d.address.bus, d.address.device, d.address.function


pytestmark = needs_qemu

# Root port -> endpoint; root port -> switch (upstream + downstream port) -> endpoint; root port ->
# PCIe-to-PCI bridge -> endpoint at slot 5 (a conventional bus: all 32 slots scanned); a multi-function
# slot on the root bus.
TOPOLOGY = [
    "-device",
    "pcie-root-port,id=rp1,chassis=1,slot=1",
    "-device",
    "virtio-rng-pci,bus=rp1",
    "-device",
    "pcie-root-port,id=rp2,chassis=2,slot=2",
    "-device",
    "x3130-upstream,id=up,bus=rp2",
    "-device",
    "xio3130-downstream,id=dn,bus=up,chassis=3,slot=0",
    "-device",
    "virtio-rng-pci,bus=dn",
    "-device",
    "pcie-root-port,id=rp3,chassis=4,slot=3",
    "-device",
    "pcie-pci-bridge,id=pb,bus=rp3",
    "-device",
    "virtio-rng-pci,bus=pb,addr=5",
    "-device",
    "virtio-rng-pci,addr=0x6.0,multifunction=on",
    "-device",
    "virtio-rng-pci,addr=0x6.3",
]


def test_q35_boot_lists_devices():
    rc, out = run("q35", TOPOLOGY)
    s = parse_serial(out)
    assert s.done, out
    assert rc == 1, f"isa-debug-exit code {rc} (status {s.status:#x}):\n{out}"  # (status 0 << 1) | 1
    assert s.status == 0 and s.scans == 1 and s.ndevices == len(s.devices)
    assert [(r.base, r.start_bus, r.end_bus, r.source) for r in s.regions] == [(0xB0000000, 0, 255, "mcfg")]
    found = {d.bdf: d for d in s.devices}
    assert (found["0000:00:00.0"].vendor, found["0000:00:00.0"].device) == (0x8086, 0x29C0)  # q35 host bridge
    for bdf in ("0000:00:01.0", "0000:00:02.0", "0000:00:03.0"):
        assert (found[bdf].vendor, found[bdf].device, found[bdf].class_code, found[bdf].header_type) == (
            0x1B36,
            0x000C,
            0x060400,
            1,
        )
    virtio = sorted(d.bdf for d in s.devices if d.vendor == 0x1AF4)
    assert len(virtio) == 5
    assert found["0000:00:06.0"].multifunction and "0000:00:06.3" in found
    up = [d for d in s.devices if (d.vendor, d.device) == (0x104C, 0x8232)]
    down = [d for d in s.devices if (d.vendor, d.device) == (0x104C, 0x8233)]
    pci_bridge = [d for d in s.devices if (d.vendor, d.device) == (0x1B36, 0x000E)]
    assert len(up) == len(down) == len(pci_bridge) == 1
    # an endpoint behind the switch's downstream port, and one at slot 5 behind the PCI bridge
    assert any(d.address.bus > down[0].address.bus and d.vendor == 0x1AF4 for d in s.devices)
    assert any(d.address.device == 5 and d.address.bus > pci_bridge[0].address.bus for d in s.devices)
    # 255 buses minus the 6 found behind bridges are brute-forced: at least 249 * 32 word reads
    assert s.config_reads > 249 * 32


def test_q35_matches_qemu_query_pci_and_memory_report():
    with Session("q35", TOPOLOGY) as q:
        before = flatten_query_pci(q.qmp("query-pci"))
        q.qmp("cont")
        serial = q.wait_done()
        # Bus numbers exist only once firmware (SeaBIOS) has programmed the bridges: ask again now.
        after = flatten_query_pci(q.qmp("query-pci"))
        mem = read_report(guest_qemu.IMAGE_PATH.read_bytes(), q.read_phys)
        status = q.qmp("query-status")
    s = parse_serial(serial)
    assert s.done and s.status == 0
    assert status["status"] == "running"  # halted in the cli; hlt loop, no exit device

    qemu = {
        (d["bus"], d["slot"], d["function"], d["id"]["vendor"], d["id"]["device"], d["class_info"]["class"])
        for d in after
    }
    guest = {(*bus_slot_function(d), d.vendor, d.device, d.class_code >> 8) for d in s.devices}
    assert guest == qemu  # query-pci gives base class + subclass, not the programming interface
    assert len(s.devices) == len(after) == 15

    # Before firmware ran, QEMU lists only the root bus (bridges have secondary bus 0).
    root = {(d["slot"], d["function"], d["id"]["vendor"], d["id"]["device"]) for d in before}
    assert root == {(*bus_slot_function(d)[1:], d.vendor, d.device) for d in s.devices if d.address.bus == 0}

    # The report in guest memory says the same as the serial port.
    assert mem.done and mem.status == 0 and mem.scans == 1
    assert mem.devices == s.devices and mem.regions == s.regions
    assert mem.config_reads == s.config_reads == mem.total_config_reads
    assert mem.rsdp_paddr != 0 and mem.mcfg_paddr != 0
    bridges = {d.bdf: (d.secondary, d.subordinate) for d in mem.devices if d.header_type == 1}
    qemu_bridges = {
        f"0000:{d['bus']:02x}:{d['slot']:02x}.{d['function']}": (
            d["pci_bridge"]["bus"]["secondary"],
            d["pci_bridge"]["bus"]["subordinate"],
        )
        for d in after
        if "pci_bridge" in d
    }
    assert bridges == qemu_bridges


def test_q35_peer_scan_cost_and_cmdline_override():
    devices = ["-device", "virtio-rng-pci"]  # root bus only: no bridges
    rc, out = run("q35", devices)
    full = parse_serial(out)
    assert rc == 1 and full.done and full.regions[0].end_bus == 255
    base = full.regions[0].base
    # Same machine, ECAM restricted to bus 0 by the command line, scanned 3 times, quietly.
    rc, out = run("q35", devices, append=f"pcihole.ecam={base:#x},0-0 pcihole.repeat=3 pcihole.quiet")
    one = parse_serial(out)
    assert rc == 1 and one.done and one.scans == 3
    assert one.devices == [] and one.regions == []  # quiet: only the final line
    assert [x for x in out.splitlines() if x.startswith("pcihole-scan:")] == [
        f"pcihole-scan: done devices={full.ndevices} config_reads={one.config_reads} status=0x00 scans=3"
    ]
    assert full.config_reads - one.config_reads == 255 * 32  # the peer-bus brute force, exactly


def test_microvm_without_mcfg_needs_the_cmdline():
    devices = ["-device", "virtio-rng-pci"]
    rc, out = run("microvm,pcie=on,acpi=on", devices)
    s = parse_serial(out)
    if not s.done:
        pytest.skip(f"microvm did not boot the PVH image here (exit {rc}): {out[-300:]!r}")
    assert s.status == ScanStatus.NO_MCFG | ScanStatus.NO_ECAM and s.config_reads == 0
    assert rc == ((ScanStatus.NO_MCFG | ScanStatus.NO_ECAM) << 1) | 1

    rc, out = run("microvm,pcie=on,acpi=on", devices, append="pcihole.ecam=0xe0000000,0-255")
    s = parse_serial(out)
    assert rc == 1 and s.done and s.status == 0
    assert [(r.base, r.start_bus, r.end_bus, r.source) for r in s.regions] == [
        (0xE0000000, 0, 255, "cmdline")
    ]
    ids = [(d.bdf, d.vendor, d.device, d.class_code) for d in s.devices]
    assert ids[0] == ("0000:00:00.0", 0x1B36, 0x0008, 0x060000)  # GPEX host bridge
    assert [i[1] for i in ids[1:]] == [0x1AF4]
    assert s.config_reads >= 32 + 255 * 32
