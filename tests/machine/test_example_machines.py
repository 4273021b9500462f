"""The example machines under examples/ (README, "Example machines") boot on both backends, and the
scan guest finds exactly the functions each file describes, following bridges as Linux does."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcihole.cli import EMBEDDED_GUEST_CMDLINE
from pcihole.guest.report import DEV_NOT_FOLLOWED, DEV_ONE_CHILD, DEV_PEER_SCAN
from pcihole.machine.builder import build_machine, default_kernel
from pcihole.machine.machinefile import load
from pcihole.pci.topology import DownstreamPortSpec, RootPortSpec
from tests.examples import BEYOND_THE_MODEL, EXAMPLES, load_for

DEBUG_EXIT = "debug-exit"  # the guest wrote to isa-debug-exit: how the scan guest ends
MACHINES = sorted(EXAMPLES.glob("*.toml"))
BACKENDS = [
    pytest.param("kvm", "ro-alias", marks=pytest.mark.kvm, id="kvm-ro-alias"),
    pytest.param("model", "native", id="model-native"),
]
#: Each example on each backend, but gpu-server on kvm only: the model refuses it (tests/examples.py).
SCANS = [
    pytest.param(path, *backend.values, marks=backend.marks, id=f"{path.stem}-{backend.id}")
    for path in MACHINES
    for backend in BACKENDS
    if not (path.stem == BEYOND_THE_MODEL and backend.values[0] == "model")
]


def test_the_examples_are_there():
    assert {p.name for p in MACHINES} >= {"gpu-server.toml", "expander.toml", "many-segments.toml"}


@pytest.mark.parametrize(("path", "backend", "strategy"), SCANS)
def test_the_scan_guest_finds_the_files_fabric(path, backend, strategy):
    spec = load(path)
    image, name = default_kernel()
    with build_machine(
        spec,
        backend=backend,
        strategy=strategy,
        kernel=image,
        kernel_name=name,
        cmdline=EMBEDDED_GUEST_CMDLINE,
    ) as m:
        result = m.run(timeout=120)
    assert (str(result.stop.reason), result.stop.status) == (DEBUG_EXIT, 0)
    found = {d.bdf: d for d in result.report.devices}
    described = {str(f.bdf): f for f in spec.topology.functions()}
    assert sorted(found) == sorted(described)
    for bdf, f in described.items():
        d = found[bdf]
        assert (d.vendor, d.device, d.class_code) == (f.vendor, f.device, f.class_code), bdf
    # Bridges: the bus numbers the file gives are those the guest read, every one was followed, and
    # only root and downstream ports are scanned for device 0 alone (only_one_child()).
    for bridge in spec.topology.all_bridges():
        d = found[str(bridge.bdf)]
        assert (d.header_type, d.secondary, d.subordinate) == (1, bridge.secondary, bridge.subordinate)
        assert not d.flags & DEV_NOT_FOLLOWED
        assert bool(d.flags & DEV_ONE_CHILD) == isinstance(bridge, (RootPortSpec, DownstreamPortSpec))
    # Everything below a main root bus was reached through bridges, not by the peer-bus brute force;
    # an expander's root bus is found by that scan (Linux finds it through the DSDT's _BBN instead).
    expander_buses = {
        (x.bdf.segment, b) for x in spec.topology.expanders for b in range(x.bus, x.last_bus + 1)
    }
    for d in result.report.devices:
        assert bool(d.flags & DEV_PEER_SCAN) == ((d.address.segment, d.address.bus) in expander_buses), d.bdf


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.kvm if p.stem == BEYOND_THE_MODEL else (), id=p.stem)
        for p in MACHINES
    ],
)
def test_run_tree_prints_what_the_guest_found_as_lspci_t(path, capsys):
    from pcihole.cli import main
    from pcihole.pci.host_bridge import HostBridge
    from pcihole.pci.lspci_tree import lspci_tree, tree_devices

    on = ["kvm"] if path.stem == BEYOND_THE_MODEL else ["model", "--strategy", "native"]
    assert main(["run", "--machine", str(path), "--backend", *on, "--tree"]) == 0
    out = capsys.readouterr().out
    expected = lspci_tree(tree_devices(HostBridge(load(path).topology)))
    assert out.startswith(expected) and out[len(expected) :].startswith("\nbackend / strategy")
    assert "----00.0-[" in expected  # a switch below a port: the tree is nested


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (
            '[[downstream_port]]\nbdf = "0000:00:03.0"\nsecondary = 0x20\n',
            [
                "downstream port 0000:00:03.0: a downstream port must be on a switch's internal bus",
                "root bus 0",
            ],
        ),
        (
            '[[upstream_port]]\nbdf = "0000:0e:00.0"\nsecondary = 0x20\n',
            ["upstream port 0000:0e:00.0: buses 32-32 are not inside root port 0000:00:02.1's buses 14-14"],
        ),
        (
            '[[pci_bridge]]\nbdf = "0000:00:05.0"\nsecondary = 3\n',
            ["pci bridge 0000:00:05.0: buses 3-3 overlap"],
        ),
        (
            '[[expander]]\nbdf = "0000:00:10.0"\nbuses = "4-8"\n',
            ["root port 0000:00:01.0: buses 1-6 are not inside"],
        ),
        ('[[downstream_port]]\nbdf = "0000:02:04.0"\nsecondary = 9\ncolour = 1\n', ["unknown key 'colour'"]),
        ('[[expander]]\nbdf = "0000:00:10.0"\n', ["expander bridge 0000:00:10.0: missing key 'buses'"]),
        (
            '[[pci_bridge]]\nbdf = "0000:00:05.0"\nsecondary = 0x20\nchassis = 300\n',
            ["chassis 0x12c is outside"],
        ),
    ],
)
def test_a_wrong_fabric_is_one_line_and_exit_2(tmp_path, extra, words):
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text((EXAMPLES / "gpu-server.toml").read_text() + "\n" + extra)
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.run(
        [sys.executable, "-m", "pcihole.cli", "run", "--machine", str(bad), "--backend", "model"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"pcihole: error: {bad}: "), line
    for w in words:
        assert w in line, line


@pytest.mark.parametrize(("backend", "strategy"), BACKENDS)
def test_hotplug_below_a_switch_punches_and_fills_holes_as_below_a_root_port(backend, strategy):
    from pcihole.pci.bdf import Bdf
    from pcihole.pci.topology import EndpointSpec

    spec = load_for(EXAMPLES / "gpu-server.toml", backend)
    gone = Bdf(0, 4, 0, 0)  # GPU 1 behind switch 0's downstream port 02:01.0
    audio = EndpointSpec(Bdf(0, 0x0A, 0, 1), 0x10DE, 0x22BA, 0x040300)  # GPU 5's audio function
    image, name = default_kernel()
    with build_machine(
        spec,
        backend=backend,
        strategy=strategy,
        kernel=image,
        kernel_name=name,
        cmdline=EMBEDDED_GUEST_CMDLINE,
    ) as m:
        slots = m.memory.stats().memslots
        m.host_bridge.remove_function(gone)
        m.host_bridge.add_function(audio)
        if strategy == "ro-alias":
            # The pages are remapped inside the window's one hole slot: no memslot changes.
            assert m.memory.stats().memslots == slots
        else:
            # The removed page's read-only mirror slot goes and the hole runs around it merge; the
            # added page gets a mirror slot, punched next to function 0's (the next run shrinks).
            assert m.memory.stats().memslots == slots - 1
        result = m.run(timeout=120)
        stats = m.host_bridge.stats
    assert (str(result.stop.reason), result.stop.status) == (DEBUG_EXIT, 0)
    found = {d.bdf for d in result.report.devices}
    assert str(gone) not in found and str(audio.bdf) in found
    assert found == {str(d.bdf) for d in result.machine_devices}
    assert [d for d in result.report.devices if d.bdf == "0000:0a:00.0"][0].multifunction
    # The GPU's old page read all-ones from the hole itself: no read reached the host bridge there.
    assert stats.absent_reads == 0 and result.memory.exits.hole_reads == 0
