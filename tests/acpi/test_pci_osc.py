"""_OSC on every PCIe host bridge and expander bridge: the real iasl disassembles it to QEMU's
method (and recompiles it to our bytes, in test_dsdt.py), and ACPICA's interpreter (acpiexec, the code
Linux runs) answers Linux's own two calls the way negotiate_os_control() needs: the query, then the
request for exactly what the query granted."""

import re
import struct

import pytest

from pcihole.acpi import ExpanderBus, build_tables
from pcihole.acpi.pci_osc import (
    OSC_CAPABILITIES_MASKED,
    OSC_PCIE_AER,
    OSC_PCIE_CAPABILITY,
    OSC_PCIE_NATIVE_HOTPLUG,
    OSC_PCIE_PME,
    OSC_UNRECOGNIZED_REVISION,
    OSC_UNRECOGNIZED_UUID,
    PCI_HOST_BRIDGE_UUID,
    granted_controls,
)
from tests.acpi.acpi_helpers import Seg, disassemble_text, needs_iasl
from tests.acpi.test_acpiexec import acpiexec, needs_acpiexec

BASE = 0x000E0000
SEGMENTS = [Seg(0, 0xE0000000, 0, 255), Seg(1, 0xD0000000, 0, 63)]
EXPANDERS = [ExpanderBus(0, 0x80, 0x8F)]
BRIDGES = ["PCI0", "PCI1", "X080"]

# What Linux 6.1 passes (drivers/acpi/pci_root.c, include/linux/acpi.h), as it logs it on pcihole:
# "OS supports [ExtendedConfig ASPM ClockPM Segments MSI HPX-Type3]" and
# "OS requested [PCIeHotplug PME AER PCIeCapability LTR]".
OSC_QUERY_ENABLE = 1
LINUX_SUPPORT = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x100
LINUX_CONTROL = 0x01 | 0x04 | 0x08 | 0x10 | 0x20
RETURNED = re.compile(r"Evaluating (\S+)\n(?:.*\n)*?\s+\[Buffer\] Length 0C =\s+0000: ((?:[0-9A-F]{2} ){12})")

UUID_BYTES = bytes.fromhex("5b4ddb33f71f1c4096577441c03dd766")  # ToUUID's byte order, written out


def buffer_arg(data: bytes) -> str:
    return "(" + " ".join(f"{b:02x}" for b in data) + ")"


def osc_call(path: str, uuid: bytes, revision: int, dwords: tuple[int, int, int]) -> str:
    """acpiexec's `execute` with _OSC's four arguments (ACPICA debugger syntax: (..) is a Buffer)."""
    return f"execute {path}._OSC {buffer_arg(uuid)} {revision} 3 {buffer_arg(struct.pack('<3I', *dwords))}"


def returned(output: str) -> dict[str, list[tuple[int, int, int]]]:
    out: dict[str, list[tuple[int, int, int]]] = {}
    for path, data in RETURNED.findall(output):
        out.setdefault(path, []).append(struct.unpack("<3I", bytes.fromhex(data.replace(" ", ""))))
    return out


def test_grants_what_qemu_grants():
    assert (
        granted_controls(True) == OSC_PCIE_NATIVE_HOTPLUG | OSC_PCIE_PME | OSC_PCIE_AER | OSC_PCIE_CAPABILITY
    )
    assert granted_controls(False) == OSC_PCIE_PME | OSC_PCIE_AER | OSC_PCIE_CAPABILITY
    # ToUUID's mixed-endian bytes, written out by hand above, are what the DSDT holds.
    assert PCI_HOST_BRIDGE_UUID.startswith("33DB4D5B")
    assert bytes([0x11, 0x13, 0x0A, 0x10]) + UUID_BYTES in build_tables(SEGMENTS[:1], BASE).tables["DSDT"]


@needs_iasl
def test_iasl_reads_qemus_osc_method_on_every_host_bridge(tmp_path):
    dsdt = build_tables(SEGMENTS, BASE, expanders=EXPANDERS, native_hotplug=[True, False]).tables["DSDT"]
    asl, output = disassemble_text(tmp_path, "DSDT", dsdt)
    assert "error" not in output.lower() and "warning" not in output.lower()
    methods = re.findall(
        r"Device \((\w{4})\)(?:(?!Device \().)*?Method \(_OSC, 4, NotSerialized\)", asl, re.S
    )
    assert methods == BRIDGES
    assert asl.count('ToUUID ("33db4d5b-1ff7-401c-9657-7441c03dd766") /* PCI Host Bridge Device */') == 3
    # PCI1 has no hot-pluggable slot: no native hot-plug; the others grant it.
    assert re.findall(r"Local0 &= (0x1[CD])", asl) == ["0x1D", "0x1C", "0x1D"]
    for line in (
        "If ((Arg1 != One))",
        "CDW1 |= 0x08",
        "If ((CDW3 != Local0))",
        "CDW1 |= 0x10",
        "CDW3 = Local0",
    ):
        assert asl.count(line) == 3, line
    assert asl.count("CDW1 |= 0x04") == 3 and asl.count("Return (Arg3)") == 3


@needs_acpiexec
def test_acpica_answers_linuxs_query_then_its_request(tmp_path):
    tables = build_tables(SEGMENTS, BASE, expanders=EXPANDERS, native_hotplug=[True, False])
    paths = [f"\\_SB.{b}" for b in BRIDGES]
    grants = {"\\_SB.PCI0": granted_controls(True), "\\_SB.PCI1": granted_controls(False)}
    grants["\\_SB.X080"] = granted_controls(True)
    commands = [osc_call(p, UUID_BYTES, 1, (OSC_QUERY_ENABLE, LINUX_SUPPORT, LINUX_CONTROL)) for p in paths]
    commands += [osc_call(p, UUID_BYTES, 1, (0, LINUX_SUPPORT, grants[p])) for p in paths]
    answers = returned(acpiexec(tmp_path, tables, commands))
    for path in paths:
        query, request = answers[f"{path}._OSC"]
        # The query: LTR (and, on PCI1, hot-plug) masked, and said so; the query bit is left as it was.
        assert query == (OSC_QUERY_ENABLE | OSC_CAPABILITIES_MASKED, LINUX_SUPPORT, grants[path])
        # The request for what was granted: no error bit at all (acpi_run_osc fails on any).
        assert request == (0, LINUX_SUPPORT, grants[path])


@needs_acpiexec
def test_acpica_reports_an_unknown_uuid_or_revision(tmp_path):
    tables = build_tables(SEGMENTS[:1], BASE)
    other_uuid = bytes(reversed(UUID_BYTES))
    commands = [
        osc_call("\\_SB.PCI0", other_uuid, 1, (0, LINUX_SUPPORT, LINUX_CONTROL)),
        osc_call("\\_SB.PCI0", UUID_BYTES, 2, (0, LINUX_SUPPORT, granted_controls(True))),
    ]
    (uuid_answer, revision_answer) = returned(acpiexec(tmp_path, tables, commands))["\\_SB.PCI0._OSC"]
    assert uuid_answer == (OSC_UNRECOGNIZED_UUID, LINUX_SUPPORT, LINUX_CONTROL)  # untouched otherwise
    assert revision_answer == (OSC_UNRECOGNIZED_REVISION, LINUX_SUPPORT, granted_controls(True))


@pytest.mark.parametrize("hotplug", [True, False])
def test_the_method_bytes_hold_the_mask(hotplug):
    dsdt = build_tables(SEGMENTS[:1], BASE, native_hotplug=[hotplug]).tables["DSDT"]
    # AndOp Local0 BytePrefix mask Local0
    assert bytes([0x7B, 0x60, 0x0A, granted_controls(hotplug), 0x60]) in dsdt
