"""The same fabric on QEMU and on pcihole: each example machine (one segment) is rebuilt from QEMU's own
devices (pcie-root-port, x3130-upstream, xio3130-downstream, pci-bridge, pxb-pcie, with virtio-rng-pci
for endpoints), the scan guest runs on both, and both report the same shape: the same functions at the
same addresses, the same bridges with the same ids, and the bus numbers SeaBIOS assigns on QEMU equal
to those the machine file gives. A strong check of the bridges' registers: the guest reads them the
way Linux does (header type, PCIe port type for only_one_child(), secondary/subordinate)."""

from __future__ import annotations

import pytest

from pcihole.cli import EMBEDDED_GUEST_CMDLINE
from pcihole.guest.report import DEV_NOT_FOLLOWED, DEV_ONE_CHILD, DEV_PEER_SCAN, read_report
from pcihole.machine.builder import build_machine, default_kernel
from pcihole.machine.machinefile import MachineFile, load
from pcihole.pci.bdf import Bdf
from pcihole.pci.topology import (
    DownstreamPortSpec,
    EndpointSpec,
    ExpanderSpec,
    PciBridgeSpec,
    RootPortSpec,
    UpstreamPortSpec,
)
from tests.examples import EXAMPLES, load_for
from tests.guest import guest_qemu
from tests.guest.guest_qemu import Session, needs_qemu

pytestmark = needs_qemu

ONE_SEGMENT = [p for p in sorted(EXAMPLES.glob("*.toml")) if len(load(p).segments) == 1]
Q35_CHIPSET = {"0000:00:00.0", "0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"}  # QEMU's own, not in the files
FLAGS = DEV_ONE_CHILD | DEV_PEER_SCAN | DEV_NOT_FOLLOWED


def qemu_devices(spec: MachineFile) -> list[str]:
    """-device options building the machine file's fabric from QEMU's device models."""
    topology = spec.topology
    ids: dict[Bdf, str] = {}
    for n, f in enumerate(topology.functions()):
        ids[f.bdf] = f"d{n}"

    def parent(bdf: Bdf) -> str:
        for x in topology.expanders:
            if x.bus == bdf.bus:
                return ids[x.bdf]
        bridge = topology.parent_bridge(bdf.segment, bdf.bus)
        return "pcie.0" if bridge is None else ids[bridge.bdf]

    args = []
    chassis = 0
    for f in topology.functions():
        b = f.bdf
        where = [f"id={ids[b]}", f"bus={parent(b)}", f"addr={b.device:#x}.{b.function}"]
        if b.function == 0 and topology.is_multifunction(b):
            where.append("multifunction=on")
        chassis += 1
        if isinstance(f, RootPortSpec):
            model = ["pcie-root-port", f"chassis={chassis}", "slot=0"]
        elif isinstance(f, UpstreamPortSpec):
            model = ["x3130-upstream"]
        elif isinstance(f, DownstreamPortSpec):
            model = ["xio3130-downstream", f"chassis={chassis}", "slot=0"]
        elif isinstance(f, PciBridgeSpec):
            model = ["pci-bridge", f"chassis_nr={f.chassis_number}", "shpc=off"]
        elif isinstance(f, ExpanderSpec):
            model = ["pxb-pcie", f"bus_nr={f.bus}"]
        elif isinstance(f, EndpointSpec):
            model = ["virtio-rng-pci"]
        else:
            continue  # the host bridge: QEMU's q35 has its own
        args += ["-device", ",".join([model[0], *where, *model[1:]])]
    return args


def shape(devices, *, endpoint_ids: bool) -> dict[str, tuple]:
    out = {}
    for d in devices:
        if d.bdf in Q35_CHIPSET:
            continue
        bridge = d.header_type == 1
        ids = (d.vendor, d.device) if bridge or endpoint_ids else None
        out[d.bdf] = (d.header_type, d.multifunction, ids, d.secondary, d.subordinate, d.flags & FLAGS)
    return out


@pytest.mark.parametrize("path", ONE_SEGMENT, ids=lambda p: p.stem)
def test_qemu_builds_the_same_fabric_and_the_guest_sees_the_same_shape(path):
    spec = load_for(path, "model")  # gpu-server's BARs shrunk to fit the model's CPU; same fabric
    with Session("q35", qemu_devices(spec)) as q:
        q.qmp("cont")
        q.wait_done()
        on_qemu = read_report(guest_qemu.IMAGE_PATH.read_bytes(), q.read_phys)
    assert on_qemu.done and on_qemu.status == 0
    image, name = default_kernel()
    with build_machine(
        spec,
        backend="model",
        strategy="native",
        kernel=image,
        kernel_name=name,
        cmdline=EMBEDDED_GUEST_CMDLINE,
    ) as m:
        on_pcihole = m.run(timeout=120).report
    assert on_pcihole is not None and on_pcihole.status == 0
    qemu_shape = shape(on_qemu.devices, endpoint_ids=False)
    ours = shape(on_pcihole.devices, endpoint_ids=False)
    assert sorted(qemu_shape) == sorted(ours)
    for bdf in ours:
        assert qemu_shape[bdf] == ours[bdf], bdf
    assert sum(1 for d in ours.values() if d[0] == 1) >= 6  # bridges were compared, not only endpoints
