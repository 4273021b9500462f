"""`pcihole run`'s machine on every backend x strategy: the guest finds exactly the topology, and
absent functions cost no exit wherever the strategy promises it (issue 6, point 5)."""

from __future__ import annotations

import json

import pytest

from pcihole.bench.scan import ACCEPTED_STATUS_BITS
from pcihole.cli import EMBEDDED_GUEST_CMDLINE, main
from pcihole.guest.build import build as build_guest
from pcihole.machine.builder import MachineBuildError, build_machine, default_kernel
from pcihole.machine.dispatch import StopReason
from pcihole.machine.machinefile import MachineFile, load_default
from pcihole.pci import synthetic
from pcihole.pci.bdf import Bdf
from pcihole.pci.topology import EndpointSpec
from tests.backends import BACKEND_STRATEGIES, BACKENDS


def pair(backend: str, strategy: str):
    marks = [pytest.mark.kvm] if backend == "kvm" else []
    return pytest.param(backend, strategy, marks=marks, id=f"{backend}-{strategy}")


#: Strategies that promise no exit for a read of an absent function.
NO_EXIT_FOR_ABSENT = {"ro-filled", "ro-alias", "native", "mmio-bus"}


def topology_keys(machine):
    return sorted(
        (str(d.bdf), d.vendor, d.device, d.class_code, d.header_type) for d in machine.host_bridge.devices()
    )


def reported_keys(result):
    return sorted((d.bdf, d.vendor, d.device, d.class_code, d.header_type) for d in result.report.devices)


def m_has_no_function_at(topology, bdf):
    return all(f.bdf != bdf for f in (*topology.root_ports, *topology.endpoints))


def run(spec, backend, strategy, kernel=None, cmdline=EMBEDDED_GUEST_CMDLINE, before_run=None):
    image, name = kernel or default_kernel()
    with build_machine(
        spec, backend=backend, strategy=strategy, kernel=image, kernel_name=name, cmdline=cmdline
    ) as m:
        if before_run:
            before_run(m)
        result = m.run(timeout=60)
        return m, result, topology_keys(m), m.host_bridge.stats


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_default_machine_scan_finds_the_topology(backend, strategy):
    _m, result, topology, bridge = run(load_default(), backend, strategy)
    assert (result.stop.reason, result.stop.status) == (StopReason.DEBUG_EXIT, 0)
    assert result.strategy == strategy and result.backend == backend
    assert reported_keys(result) == topology
    assert result.report.config_reads > 8000  # 256 buses brute-forced, as Linux does
    # The guest timed its own scan (pcihole_timing), and that is what the JSON reports.
    assert result.guest_scan_seconds is not None and result.guest_scan_seconds > 0
    assert result.to_json()["stats"]["scan_seconds"] == round(result.guest_scan_seconds, 6)
    # Absent functions are answered by the hole (the memory map), never by the host bridge.
    assert bridge.absent_reads == 0
    hole_reads = result.memory.exits.hole_reads
    if strategy in NO_EXIT_FOR_ABSENT:
        # No ECAM exit at all: absent functions read from the hole, present ones from their
        # read-only config mirror (the scan guest writes nothing).
        assert hole_reads == 0
        assert result.stats.ecam_exits == bridge.config_reads + bridge.config_writes == 0
    else:
        # Every config read the guest made exited: the absent ones answered with the fill.
        assert result.stats.ecam_exits == result.report.config_reads == bridge.config_reads + hole_reads
        assert hole_reads > 8000
    json.dumps(result.to_json())  # serialisable


@pytest.mark.parametrize(
    ("backend", "strategy"),
    [
        pair("kvm", "ro-alias"),
        pair("kvm", "exit"),
        *(pair("model", s) for s in ("ro-alias", "native", "mmio-bus")),
    ],
)
def test_a_full_scan_of_1024_functions_costs_no_ecam_exit_where_reads_are_mirrored(backend, strategy):
    spec = MachineFile(path="<1024>", name="1024", ram_mib=64, topology=synthetic.generate(1024))
    _m, result, topology, bridge = run(spec, backend, strategy)
    # The report holds fewer devices than 1024 (its "truncated" bit); the scan itself is complete.
    assert (
        result.stop.reason == StopReason.DEBUG_EXIT and not (result.stop.status or 0) & ~ACCEPTED_STATUS_BITS
    )
    assert result.report.config_reads > 5000
    if strategy == "exit":  # as QEMU: every access exits
        assert result.stats.ecam_exits == result.report.config_reads
    else:
        assert result.stats.ecam_exits == 0
        assert bridge.config_reads == 0


@pytest.mark.parametrize(
    ("backend", "strategy"), [pair("kvm", "ro-alias"), pair("model", "native"), pair("model", "exit")]
)
def test_four_segments_and_a_hot_added_function(backend, strategy):
    topo = synthetic.generate(24, buses=16, segments=4)
    spec = MachineFile("<synthetic>", "four segments", 16, topo)
    seg = topo.segments[3]
    # Slot 0x1e on segment 3's root bus is free in the synthetic layout (checked below).
    added = EndpointSpec(
        Bdf(seg.id, seg.root_bus, 0x1E, 0), vendor=0x1AF4, device=0x1043, class_code=0x078000
    )
    assert m_has_no_function_at(topo, added.bdf)

    m, result, topology, _bridge = run(
        spec, backend, strategy, before_run=lambda m: m.host_bridge.add_function(added)
    )
    assert result.stop.status == 0
    assert len(result.report.regions) == 4
    assert reported_keys(result) == topology
    assert (str(added.bdf), 0x1AF4, 0x1043, 0x078000, 0) in reported_keys(result)


@pytest.mark.kvm
def test_a_strategy_the_backend_lacks_names_what_is_missing():
    image, name = default_kernel()
    with pytest.raises(MachineBuildError, match="KVM_CAP_PCI_HOLE_MEM"):
        build_machine(load_default(), backend="kvm", strategy="native", kernel=image, kernel_name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rebuilt_guest_runs(tmp_path, backend):
    """The image built from source now (not the committed one) boots and finds the topology."""
    image = build_guest(tmp_path / "scan.elf")
    _m, result, topology, _bridge = run(
        load_default(), backend, "auto", kernel=(image, str(tmp_path / "scan.elf"))
    )
    assert result.stop.status == 0
    assert reported_keys(result) == topology


def test_cli_run_json_has_exactly_the_documented_keys(capsys):
    assert main(["run", "--backend", "model", "--strategy", "ro-alias", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"backend", "strategy", "devices", "stats"}
    assert set(out["stats"]) == {"exits", "config_reads", "scan_seconds", "hole_backing_bytes", "memslots"}
    assert set(out["stats"]["exits"]) == {"mmio_read", "mmio_write", "io", "total"}
    assert set(out["devices"][0]) == {"bdf", "vendor", "device", "class", "header_type"}
    assert out["devices"][0] == {
        "bdf": "0000:00:00.0",
        "vendor": "0x1b36",
        "device": "0x0008",
        "class": "0x060000",
        "header_type": 0,
    }
    assert out["stats"]["hole_backing_bytes"] == 64 * 1024
    assert out["stats"]["exits"]["total"] == sum(v for k, v in out["stats"]["exits"].items() if k != "total")


def test_cli_run_prints_an_lspci_like_list(capsys):
    assert main(["run", "--backend", "model"]) == 0
    out = capsys.readouterr().out
    assert "0000:00:02.0 PCI bridge [0604]: 1b36:000c" in out
    assert "0000:01:00.0 Ethernet controller [0200]: 1af4:1041" in out


def test_cli_acpi_writes_tables(tmp_path):
    assert main(["acpi", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["APIC.dat", "DSDT.dat", "FACP.dat", "MCFG.dat", "RSDP.dat", "XSDT.dat"]
    mcfg = (tmp_path / "MCFG.dat").read_bytes()
    assert mcfg[:4] == b"MCFG" and sum(mcfg) % 256 == 0
