"""The scan algorithm, checked exactly on Unicorn with synthetic ACPI tables and config spaces.

Every expected number of config reads below is counted by hand from Linux's probe order
(docs/linux-ecam.md section 4): 32 function-0 dword reads per scanned bus, 7 more per
multi-function slot, a header-type byte and a class dword per present function, a bus-number dword and a
capability walk per bridge, 16-bit vendor reads for the peer-bus brute force.
"""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")

from pcihole.guest.report import (  # noqa: E402
    DEV_NOT_FOLLOWED,
    DEV_ONE_CHILD,
    DEV_PEER_SCAN,
    ScanStatus,
    parse_serial,
)
from tests.guest.guest_unicorn import Function, Machine, bridge, endpoint, run  # noqa: E402

HOST = dict(vendor=0x8086, device=0x29C0, class_code=0x060000, revision=0)


def machine(end_bus=0, **kw) -> Machine:
    m = Machine(ecam=[(0xB0000000, 0, 0, end_bus)], **kw)
    m.add(0, 0, 0, endpoint(**HOST))
    return m


def check(res, status=0):
    """What holds for every run: no ECAM writes, report done, serial == memory, exit byte == status."""
    assert res.writes == []
    rep = res.report
    assert rep.done and rep.status == status
    assert res.exit_code == status & 0xFF
    assert rep.total_config_reads == sum(res.reads.values())
    ser = parse_serial(res.serial)
    assert ser.done and ser.status == status and ser.config_reads == rep.config_reads
    assert ser.ndevices == rep.ndevices and ser.scans == rep.scans
    if ser.devices or ser.regions:  # not quiet
        assert ser.devices == rep.devices
        assert ser.regions == rep.regions
    return rep


def bdfs(rep):
    return [d.bdf for d in rep.devices]


def test_single_bus_with_multifunction_slot():
    m = machine()
    m.add(0, 3, 0, endpoint(multifunction=True))
    m.add(0, 3, 2, endpoint(device=0x1042))
    res = run(m)
    rep = check(res)
    assert bdfs(rep) == ["0000:00:00.0", "0000:00:03.0", "0000:00:03.2"]
    assert rep.config_reads == 32 + 7 + 3 * 2
    assert res.reads == {4: 32 + 7 + 3, 1: 3}
    assert res.read_log[0] == (0, 0, 0, 0, 4)
    # the multifunction slot: functions 1..7 each probed once at offset 0
    assert [e[2] & 7 for e in res.read_log if e[2] >> 3 == 3 and e[3] == 0] == list(range(8))
    assert rep.devices[1].multifunction and not rep.devices[2].multifunction


def test_single_function_device_functions_not_probed():
    m = machine()
    m.add(0, 3, 0, endpoint())
    m.add(0, 3, 1, endpoint())  # invisible: function 0 is not multifunction
    rep = check(run(m))
    assert bdfs(rep) == ["0000:00:00.0", "0000:00:03.0"]
    assert rep.config_reads == 32 + 2 * 2


def test_full_segment_peer_scan_costs_32_word_reads_per_empty_bus():
    res = run(machine(end_bus=255))
    rep = check(res)
    assert rep.config_reads == 34 + 255 * 32 == 8194
    assert res.reads[2] == 255 * 32
    peer = [e for e in res.read_log if e[1] > 0]
    assert {(e[2] & 7, e[3], e[4]) for e in peer} == {(0, 0, 2)}  # devfn step 8, vendor ID, 16 bits
    assert len({(e[1], e[2]) for e in peer}) == 255 * 32


@pytest.mark.parametrize("bad", [(0xFFFF, 0x0000), (0x0000, 0xFFFF), (0, 0)])
def test_absent_id_patterns(bad):
    m = machine()
    m.add(0, 5, 0, Function(bad[0], bad[1], 0x020000))
    rep = check(run(m))
    assert bdfs(rep) == ["0000:00:00.0"]
    assert rep.config_reads == 34


@pytest.mark.parametrize("ptype, one_child", [(4, True), (6, True), (5, False), (None, False)])
def test_only_one_child_below_root_and_downstream_ports(ptype, one_child):
    m = machine(end_bus=1)
    m.add(0, 1, 0, bridge(1, 1, pcie_type=ptype))
    m.add(1, 0, 0, endpoint())
    m.add(1, 1, 0, endpoint(device=0x1042))
    rep = check(run(m))
    cap_walk = 5 if ptype is not None else 1  # status, cap ptr, PM entry, EXP entry, EXP flags | status only
    bus0 = 32 + 2 * 2 + 1 + cap_walk
    if one_child:
        assert bdfs(rep) == ["0000:00:00.0", "0000:00:01.0", "0000:01:00.0"]
        assert rep.config_reads == bus0 + 1 + 2
        assert rep.devices[1].flags == DEV_ONE_CHILD
    else:
        assert bdfs(rep) == ["0000:00:00.0", "0000:00:01.0", "0000:01:00.0", "0000:01:01.0"]
        assert rep.config_reads == bus0 + 32 + 2 * 2
        assert rep.devices[1].flags == 0
    assert (rep.devices[1].secondary, rep.devices[1].subordinate) == (1, 1)


def test_pcie_switch_recursion():
    m = machine(end_bus=3)
    m.add(0, 1, 0, bridge(1, 3, pcie_type=4))
    m.add(1, 0, 0, bridge(2, 3, pcie_type=5, primary=1))
    m.add(2, 0, 0, bridge(3, 3, pcie_type=6, primary=2))
    m.add(3, 0, 0, endpoint())
    rep = check(run(m))
    assert bdfs(rep) == ["0000:00:00.0", "0000:00:01.0", "0000:01:00.0", "0000:02:00.0", "0000:03:00.0"]
    assert rep.config_reads == (32 + 4) + 6 + (1 + 2) + 6 + (32 + 2) + 6 + (1 + 2)


def test_peer_bus_found_by_brute_force():
    m = machine(end_bus=3)
    m.add(2, 4, 0, endpoint())
    rep = check(run(m))
    assert bdfs(rep) == ["0000:00:00.0", "0000:02:04.0"]
    assert rep.devices[1].flags == DEV_PEER_SCAN and rep.devices[0].flags == 0
    assert rep.config_reads == 34 + 32 + (5 + 32 + 2) + 32


def test_bridges_not_followed():
    m = machine(end_bus=7)
    m.add(0, 1, 0, bridge(0, 0, pcie_type=4))  # unconfigured: bus numbers are not assigned by the guest
    m.add(0, 2, 0, bridge(9, 9, pcie_type=4))  # secondary outside the ECAM window
    m.add(0, 3, 0, bridge(5, 5, pcie_type=4))
    m.add(0, 4, 0, bridge(5, 5, pcie_type=4))  # same secondary again: scanned once
    m.add(5, 0, 0, endpoint())
    rep = check(run(m))
    assert bdfs(rep) == [
        "0000:00:00.0",
        "0000:00:01.0",
        "0000:00:02.0",
        "0000:00:03.0",
        "0000:00:04.0",
        "0000:05:00.0",
    ]
    flags = [d.flags for d in rep.devices[1:5]]
    assert flags == [
        DEV_ONE_CHILD | DEV_NOT_FOLLOWED,
        DEV_ONE_CHILD | DEV_NOT_FOLLOWED,
        DEV_ONE_CHILD,
        DEV_ONE_CHILD | DEV_NOT_FOLLOWED,
    ]
    assert rep.config_reads == 32 + 5 * 2 + 4 * 6 + 3 + 6 * 32  # buses 1-4, 6, 7 brute-forced


def test_cyclic_capability_list_is_bounded():
    m = machine(end_bus=1)
    b = m.add(0, 1, 0, bridge(1, 1))
    b.caps([(0x40, 0x01, b"")])
    b.cfg[0x41] = 0x40  # next -> itself
    m.add(1, 0, 0, endpoint())
    m.add(1, 2, 0, endpoint())
    rep = check(run(m))
    assert len(rep.devices) == 4  # not treated as a PCIe port: the whole secondary bus is scanned
    assert rep.config_reads == 32 + 4 + 1 + 2 + 48 + 32 + 4


def test_cmdline_regions_several_segments_override_mcfg():
    m = Machine(
        ecam=[(0xB0000000, 0, 0, 0), (0xC0000000, 1, 0, 1)],
        mcfg_entries=[(0xD0000000, 0, 0, 255)],  # wrong on purpose: must not be used
        cmdline="console=ttyS0 pcihole.ecam=0xb0000000,0-0  pcihole.ecam=3221225472,0x0-0x1,1 quiet",
    )
    m.add(0, 0, 0, endpoint(**HOST))
    m.add(0, 0, 0, endpoint(device=0x1043), segment=1)
    m.add(1, 3, 0, endpoint(device=0x1044), segment=1)
    rep = check(run(m))
    assert bdfs(rep) == ["0000:00:00.0", "0001:00:00.0", "0001:01:03.0"]
    assert [(r.base, r.segment, r.start_bus, r.end_bus, r.source) for r in rep.regions] == [
        (0xB0000000, 0, 0, 0, "cmdline"),
        (0xC0000000, 1, 0, 1, "cmdline"),
    ]
    assert rep.mcfg_paddr == 0 and rep.rsdp_paddr == 0  # ACPI not read
    assert rep.config_reads == 34 + 34 + (4 + 32 + 2)


def test_region_start_bus_is_the_root_bus():
    m = Machine(ecam=[(0xB0000000, 0, 0x10, 0x11)])
    m.add(0x10, 0, 0, endpoint(**HOST))
    m.add(0x11, 1, 0, endpoint())
    res = run(m)
    rep = check(res)
    assert bdfs(rep) == ["0000:10:00.0", "0000:11:01.0"]
    assert min(e[1] for e in res.read_log) == 0x10


@pytest.mark.parametrize("entries", [[(0x1_0000_0000, 1, 0, 255)], [(0xF8000000, 1, 0, 255)]])
def test_mcfg_region_above_4g_is_skipped(entries):
    m = machine()
    m.mcfg_entries = entries + [(0xB0000000, 0, 0, 0)]
    rep = check(run(m), ScanStatus.REGION_SKIPPED)
    assert [r.skipped for r in rep.regions] == [True, False]
    assert bdfs(rep) == ["0000:00:00.0"]


@pytest.mark.parametrize(
    "kw, status, rsdp",
    [
        (dict(rsdp_hint=False), 0, 0xF0010),
        (dict(rsdp_revision=0), 0, 0xF0010),
        (dict(rsdp_at=0x9000), 0, 0x9000),
        (dict(rsdp_at=0x9000, rsdp_hint=False), ScanStatus.NO_ACPI | ScanStatus.NO_ECAM, 0),
        (dict(corrupt="xsdt"), ScanStatus.BAD_TABLE, 0xF0010),
        (dict(corrupt="mcfg"), ScanStatus.BAD_TABLE | ScanStatus.NO_MCFG | ScanStatus.NO_ECAM, 0xF0010),
        (dict(corrupt="rsdp"), ScanStatus.BAD_TABLE | ScanStatus.NO_ACPI | ScanStatus.NO_ECAM, 0),
        (dict(with_mcfg=False), ScanStatus.NO_MCFG | ScanStatus.NO_ECAM, 0xF0010),
        (dict(with_acpi=False), ScanStatus.NO_ACPI | ScanStatus.NO_ECAM, 0),
        (dict(start_info_magic=0, cmdline="pcihole.quiet"), ScanStatus.BAD_START_INFO, 0xF0010),
    ],
)
def test_acpi_discovery(kw, status, rsdp):
    m = machine(**kw)
    rep = check(run(m), status)
    assert rep.rsdp_paddr == rsdp
    if status & ScanStatus.NO_ECAM:
        assert rep.config_reads == 0 and rep.devices == []
    else:
        assert bdfs(rep) == ["0000:00:00.0"] and rep.regions[0].source == "mcfg"
        assert rep.mcfg_paddr != 0


def test_quiet_and_repeat():
    m = machine(end_bus=2, cmdline="pcihole.repeat=3 pcihole.quiet")
    res = run(m)
    rep = check(res)
    lines = [x for x in res.serial.splitlines() if x]
    assert lines == [f"pcihole-scan: done devices=1 config_reads={34 + 64} status=0x00 scans=3"]
    assert rep.scans == 3 and rep.total_config_reads == 3 * rep.config_reads == 3 * 98


@pytest.mark.parametrize(
    "opt",
    [
        "pcihole.ecam=0xb0000000",
        "pcihole.ecam=0xb0000000,5-2",
        "pcihole.ecam=0xb0000000,0-256",
        "pcihole.repeat=0",
        "pcihole.repeat=x",
        "pcihole.quietly",
        "pcihole.bogus=1",
    ],
)
def test_bad_options_are_reported_and_ignored(opt):
    rep = check(run(machine(cmdline=f"{opt} pcihole.repeat=2")), ScanStatus.BAD_OPTION)
    assert bdfs(rep) == ["0000:00:00.0"] and rep.regions[0].source == "mcfg"
    assert rep.scans == 2


def test_more_devices_than_the_report_holds():
    m = machine(end_bus=1)
    m.functions[(0, 0, 0)] = endpoint(**HOST, multifunction=True)
    for dev in range(32):
        for fn in range(8):
            if (dev, fn) != (0, 0):
                m.add(0, dev, fn, endpoint(multifunction=(fn == 0)))
    m.add(1, 0, 0, endpoint())  # the 257th, found by the peer scan
    res = run(m)
    rep = check(res, ScanStatus.TRUNCATED)
    assert rep.ndevices == 257 and len(rep.devices) == 256 and rep.truncated
    assert rep.devices[-1].bdf == "0000:00:1f.7"
    assert rep.config_reads == 256 * 3 + 1 + (32 + 2)  # the peer probe stops at the first valid vendor ID
