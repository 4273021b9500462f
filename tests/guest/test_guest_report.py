"""report.py: the memory-struct and serial-line parsers, on hand-made inputs."""

from __future__ import annotations

import pytest

from pcihole.guest.report import (
    DEVICE,
    HEADER,
    REGION,
    REPORT_MAGIC,
    DeviceArea,
    EcamRegion,
    ReportError,
    ScannedDevice,
    ScanStatus,
    parse_report,
    parse_serial,
    status_names,
)
from pcihole.pci.bdf import Bdf

DEVICES_GPA = 0x8000
MEMORY_SIZE = 0x10000


def _report(
    devices,
    regions,
    *,
    ndevices=None,
    magic=REPORT_MAGIC,
    max_devices=4,
    state=2,
    status=0,
    devices_paddr=DEVICES_GPA,
):
    """(the report's bytes, read_phys over a small guest memory holding its device list)."""
    hdr = HEADER.pack(
        magic,
        2,
        0x38,
        2,
        max_devices,
        state,
        status,
        3,
        100,
        300,
        len(devices) if ndevices is None else ndevices,
        len(regions),
        0xF0000,
        0x7FE0000,
        devices_paddr,
    )
    regs = b"".join(REGION.pack(*r, 0) for r in regions).ljust(2 * REGION.size, b"\0")
    memory = bytearray(MEMORY_SIZE)
    devs = b"".join(DEVICE.pack(*d) for d in devices).ljust(max_devices * DEVICE.size, b"\0")
    memory[DEVICES_GPA : DEVICES_GPA + len(devs)] = devs

    def read_phys(gpa: int, size: int) -> bytes:
        if gpa + size > MEMORY_SIZE:
            raise ValueError(f"[{gpa:#x}, +{size:#x}) is not inside one RAM/ROM region")
        return bytes(memory[gpa : gpa + size])

    return hdr + regs, read_phys


def test_layout_sizes():
    assert (HEADER.size, REGION.size, DEVICE.size) == (0x38, 16, 16)


def test_parse_report_fields():
    data, read_phys = _report(
        [
            (0, 1, 0x0A, 0x1AF4, 0x1041, 0x02000001, 0x80, 0x01, 0, 0),
            (0, 0, 0x08, 0x1B36, 0x000C, 0x06040000, 0x01, 2, 1, 3),
        ],
        [(0xB0000000, 0, 0, 255, 1, 0), (0x1_0000_0000, 1, 0, 15, 2, 1)],
    )
    r = parse_report(data, read_phys)
    assert r.done and r.scans == 3 and r.config_reads == 100 and r.total_config_reads == 300
    assert (r.rsdp_paddr, r.mcfg_paddr) == (0xF0000, 0x7FE0000)
    assert r.regions == [
        EcamRegion(0xB0000000, 0, 0, 255, "mcfg", False),
        EcamRegion(1 << 32, 1, 0, 15, "cmdline", True),
    ]
    d0, d1 = r.devices
    assert d0.bdf == "0000:01:01.2" and (d0.vendor, d0.device) == (0x1AF4, 0x1041)
    assert (d0.class_code, d0.revision, d0.header_type, d0.multifunction) == (0x020000, 1, 0, True)
    assert d0.flags == 1
    assert (d1.header_type, d1.secondary, d1.subordinate) == (1, 1, 3)
    assert d0.line() == "pcihole-scan: 0000:01:01.2 1af4:1041 class 020000 rev 01 hdr 80"


def test_parse_report_truncated_device_list():
    devs = [(0, 0, i * 8, 0x8086, i, 0, 0, 0, 0, 0) for i in range(4)]
    r = parse_report(*_report(devs, [], ndevices=9, status=ScanStatus.TRUNCATED))
    assert len(r.devices) == 4 and r.ndevices == 9 and r.truncated
    assert status_names(r.status) == ["truncated"]


def _with_data(report, cut):
    data, read_phys = report
    return data[:cut], read_phys


@pytest.mark.parametrize(
    "report, msg",
    [
        ((bytes(0x38 + 32), _report([], [])[1]), "not started"),
        (_report([], [], magic=0x12345678), "magic"),
        (_with_data(_report([], []), 20), "too short"),
        (_with_data(_report([], [(0xB0000000, 0, 0, 255, 1, 0)]), 0x38 + 8), "truncated"),
        (
            _report([(0, 0, 0, 1, 2, 0, 0, 0, 0, 0)], [], devices_paddr=MEMORY_SIZE - 8),
            "cannot read the device list",
        ),
    ],
)
def test_parse_report_errors(report, msg):
    with pytest.raises(ReportError, match=msg):
        parse_report(*report)


def test_a_guest_cannot_move_its_device_list_out_of_the_area_it_was_given():
    """Everything in the report is the guest's: with the area the VMM gave, the reader refuses a list
    elsewhere or longer, instead of reading what the guest points at."""
    devs = [(0, 0, 8, 0x8086, 1, 0, 0, 0, 0, 0)]
    assert len(parse_report(*_report(devs, []), DeviceArea(DEVICES_GPA, 4)).devices) == 1
    with pytest.raises(ReportError, match="not in the area"):
        parse_report(*_report(devs, [], devices_paddr=0x100), DeviceArea(DEVICES_GPA, 4))
    with pytest.raises(ReportError, match="not in the area"):
        parse_report(*_report(devs, [], max_devices=5), DeviceArea(DEVICES_GPA, 4))


SERIAL = """\
SeaBIOS noise
pcihole-scan: ecam 0000 base=0x00000000b0000000 buses=00-ff source=mcfg\r
pcihole-scan: ecam 0001 base=0x0000000100000000 buses=00-0f source=cmdline skipped
pcihole-scan: 0000:00:00.0 8086:29c0 class 060000 rev 00 hdr 00
pcihole-scan: 0000:00:1f.2 8086:2922 class 010601 rev 02 hdr 80
pcihole-scan: done devices=2 config_reads=8187 status=0x08 scans=1
"""


def test_parse_serial():
    s = parse_serial(SERIAL)
    assert (
        s.done
        and s.ndevices == 2
        and s.config_reads == 8187
        and s.status == ScanStatus.NO_MCFG
        and s.scans == 1
    )
    assert [r.source for r in s.regions] == ["mcfg", "cmdline"] and s.regions[1].skipped
    assert s.regions[1].base == 1 << 32 and s.regions[1].end_bus == 15
    assert [d.bdf for d in s.devices] == ["0000:00:00.0", "0000:00:1f.2"]
    sata = s.devices[1]
    assert (sata.vendor, sata.device, sata.class_code, sata.revision, sata.multifunction) == (
        0x8086,
        0x2922,
        0x010601,
        2,
        True,
    )
    assert sata.line() + "\n" in SERIAL  # line() and the parser agree


def test_parse_serial_incomplete_and_malformed():
    assert not parse_serial(SERIAL.split("pcihole-scan: done")[0]).done
    with pytest.raises(ReportError):
        parse_serial("pcihole-scan: 0000:00:00.0 8086:29c0 class 0600 hdr 00\n")


def test_device_equality_ignores_memory_only_fields():
    a = ScannedDevice(Bdf(0, 0, 1, 0), 1, 2, 3, 4, 1, False, flags=2, secondary=1, subordinate=1)
    b = ScannedDevice(Bdf(0, 0, 1, 0), 1, 2, 3, 4, 1, False)
    assert a == b and a.key() == ("0000:00:01.0", 1, 2, 3)


EXITLOOP_LINE = (
    "pcihole-scan: exitloop reads=1000 absent=0xe0008000 absent_tsc=0x0000000000989680"
    " present=0xe0000000 present_tsc=0x00000000000f4240 ram_tsc=0x00000000000186a0\n"
)


def test_parse_serial_exitloop_line():
    done = SERIAL.splitlines(keepends=True)[-1]
    s = parse_serial(SERIAL.replace(done, EXITLOOP_LINE + done))
    assert s.done and s.ndevices == 2  # the rest of the report is read as before
    loop = s.exit_loop
    assert loop is not None
    assert (loop.reads, loop.absent_addr, loop.present_addr) == (1000, 0xE0008000, 0xE0000000)
    assert (loop.absent_tsc, loop.present_tsc, loop.ram_tsc) == (10_000_000, 1_000_000, 100_000)
    assert loop.absent_ticks_per_read() == (10_000_000 - 100_000) / 1000
    assert loop.present_ticks_per_read() == (1_000_000 - 100_000) / 1000
    assert parse_serial(SERIAL).exit_loop is None  # without the option: no line, no loop


def test_an_exitloop_with_no_absent_function_has_no_cost_per_read():
    found = "absent=0xe0008000 absent_tsc=0x0000000000989680"
    line = EXITLOOP_LINE.replace(found, f"absent=0x{0:08x} absent_tsc=0x{0:016x}")
    loop = parse_serial(line).exit_loop
    assert loop is not None and loop.absent_ticks_per_read() is None
    assert loop.present_ticks_per_read() is not None


def test_a_malformed_exitloop_line_is_an_error():
    with pytest.raises(ReportError):
        parse_serial(EXITLOOP_LINE.replace("ram_tsc=0x", "ram_tsc="))
