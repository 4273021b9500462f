"""FADT ("FACP") and MADT ("APIC"): every field, and every decoded flag bit, read back by the real iasl."""

import struct

import pytest

from pcihole.acpi import build_tables
from pcihole.acpi.fadt import build_fadt
from pcihole.acpi.madt import build_madt
from tests.acpi.acpi_helpers import (
    Seg,
    byte_sum,
    decoded_bits,
    disassemble,
    disassemble_text,
    header_fields,
    needs_iasl,
)

SEGMENTS = [Seg(0, 0xE0000000, 0, 255)]
BASE = 0x000E0000


def gas(offset: int, title: str) -> list[tuple[int, int, str, str]]:
    """An all-zero Generic Address Structure as iasl lists it: no register there."""
    return [
        (offset, 12, title, "[Generic Address Structure]"),
        (offset, 1, "Space ID", "00 [SystemMemory]"),
        (offset + 1, 1, "Bit Width", "00"),
        (offset + 2, 1, "Bit Offset", "00"),
        (offset + 3, 1, "Encoded Access Width", "00 [Undefined/Legacy]"),
        (offset + 4, 8, "Address", "0000000000000000"),
    ]


def io_port_gas(offset: int, title: str, port: int) -> list[tuple[int, int, str, str]]:
    """An 8-bit SystemIO register at `port`, byte access, as iasl lists it."""
    return [
        (offset, 12, title, "[Generic Address Structure]"),
        (offset, 1, "Space ID", "01 [SystemIO]"),
        (offset + 1, 1, "Bit Width", "08"),
        (offset + 2, 1, "Bit Offset", "00"),
        (offset + 3, 1, "Encoded Access Width", "01 [Byte Access:8]"),
        (offset + 4, 8, "Address", f"{port:016X}"),
    ]


POWER_PORT = 0x600  # the sleep/reset register (cloud-hypervisor's port), written out independently


def expected_fadt(fadt: bytes, dsdt: int) -> list[tuple[int, int, str, str]]:
    fields = header_fields(fadt, "FACP", "Fixed ACPI Description Table (FADT)", revision=6)
    fields.append((36, 4, "FACS Address", "00000000"))  # hardware-reduced: no FACS
    fields.append((40, 4, "DSDT Address", f"{dsdt:08X}"))
    fields.append((44, 1, "Model", "00"))
    fields.append((45, 1, "PM Profile", "00 [Unspecified]"))
    for offset, size, name in [
        (46, 2, "SCI Interrupt"),
        (48, 4, "SMI Command Port"),
        (52, 1, "ACPI Enable Value"),
        (53, 1, "ACPI Disable Value"),
        (54, 1, "S4BIOS Command"),
        (55, 1, "P-State Control"),
        (56, 4, "PM1A Event Block Address"),
        (60, 4, "PM1B Event Block Address"),
        (64, 4, "PM1A Control Block Address"),
        (68, 4, "PM1B Control Block Address"),
        (72, 4, "PM2 Control Block Address"),
        (76, 4, "PM Timer Block Address"),
        (80, 4, "GPE0 Block Address"),
        (84, 4, "GPE1 Block Address"),
        (88, 1, "PM1 Event Block Length"),
        (89, 1, "PM1 Control Block Length"),
        (90, 1, "PM2 Control Block Length"),
        (91, 1, "PM Timer Block Length"),
        (92, 1, "GPE0 Block Length"),
        (93, 1, "GPE1 Block Length"),
        (94, 1, "GPE1 Base Offset"),
        (95, 1, "_CST Support"),
        (96, 2, "C2 Latency"),
        (98, 2, "C3 Latency"),
        (100, 2, "CPU Cache Size"),
        (102, 2, "Cache Flush Stride"),
        (104, 1, "Duty Cycle Offset"),
        (105, 1, "Duty Cycle Width"),
        (106, 1, "RTC Day Alarm Index"),
        (107, 1, "RTC Month Alarm Index"),
        (108, 1, "RTC Century Index"),
    ]:
        fields.append((offset, size, name, "0" * (2 * size)))
    # IAPC_BOOT_ARCH: legacy devices (bit 0), no VGA (bit 2), no CMOS RTC (bit 5); no 8042 (bit 1 clear).
    fields.append((109, 2, "Boot Flags (decoded below)", f"{1 | 1 << 2 | 1 << 5:04X}"))
    fields.append((111, 1, "Reserved", "00"))
    # WBINVD (0), control-method power (4) and sleep (5) buttons, RESET_REG_SUP (10), HW_REDUCED_ACPI (20).
    fields.append((112, 4, "Flags (decoded below)", f"{1 | 1 << 4 | 1 << 5 | 1 << 10 | 1 << 20:08X}"))
    fields += io_port_gas(116, "Reset Register", POWER_PORT)
    fields.append((128, 1, "Value to cause reset", "01"))
    fields.append((129, 2, "ARM Flags (decoded below)", "0000"))
    fields.append((131, 1, "FADT Minor Revision", "05"))
    fields.append((132, 8, "FACS Address", "0" * 16))
    fields.append((140, 8, "DSDT Address", f"{dsdt:016X}"))
    for offset, title in [
        (148, "PM1A Event Block"),
        (160, "PM1B Event Block"),
        (172, "PM1A Control Block"),
        (184, "PM1B Control Block"),
        (196, "PM2 Control Block"),
        (208, "PM Timer Block"),
        (220, "GPE0 Block"),
        (232, "GPE1 Block"),
    ]:
        fields += gas(offset, title)
    fields += io_port_gas(244, "Sleep Control Register", POWER_PORT)
    fields += io_port_gas(256, "Sleep Status Register", POWER_PORT)
    fields.append((268, 8, "Hypervisor ID", f"{int.from_bytes(b'PCIHOLE_', 'little'):016X}"))
    return fields


EXPECTED_FADT_BITS = [
    # IAPC_BOOT_ARCH
    ("Legacy Devices Supported (V2)", 1),
    ("8042 Present on ports 60/64 (V2)", 0),
    ("VGA Not Present (V4)", 1),
    ("MSI Not Supported (V4)", 0),
    ("PCIe ASPM Not Supported (V4)", 0),
    ("CMOS RTC Not Present (V5)", 1),
    # Flags
    ("WBINVD instruction is operational (V1)", 1),
    ("WBINVD flushes all caches (V1)", 0),
    ("All CPUs support C1 (V1)", 0),
    ("C2 works on MP system (V1)", 0),
    ("Control Method Power Button (V1)", 1),
    ("Control Method Sleep Button (V1)", 1),
    ("RTC wake not in fixed reg space (V1)", 0),
    ("RTC can wake system from S4 (V1)", 0),
    ("32-bit PM Timer (V1)", 0),
    ("Docking Supported (V1)", 0),
    ("Reset Register Supported (V2)", 1),
    ("Sealed Case (V3)", 0),
    ("Headless - No Video (V3)", 0),
    ("Use native instr after SLP_TYPx (V3)", 0),
    ("PCIEXP_WAK Bits Supported (V4)", 0),
    ("Use Platform Timer (V4)", 0),
    ("RTC_STS valid on S4 wake (V4)", 0),
    ("Remote Power-on capable (V4)", 0),
    ("Use APIC Cluster Model (V4)", 0),
    ("Use APIC Physical Destination Mode (V4)", 0),
    ("Hardware Reduced (V5)", 1),
    ("Low Power S0 Idle (V5)", 0),
    # ARM flags
    ("PSCI Compliant", 0),
    ("Must use HVC for PSCI", 0),
]


def test_fadt_layout():
    t = build_tables(SEGMENTS, BASE)
    fadt = t.tables["FACP"]
    assert len(fadt) == 276  # revision 6: through the Hypervisor Vendor Identity
    assert byte_sum(fadt) == 0
    assert fadt[8] == 6
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & 1 << 20  # HW_REDUCED_ACPI
    assert flags & 1 << 10  # RESET_REG_SUP: the reset register at the power port
    boot = struct.unpack_from("<H", fadt, 109)[0]
    assert boot & 1 << 2 and boot & 1 << 5 and not boot & 1 << 1
    assert (
        struct.unpack_from("<I", fadt, 36)[0] == 0 and struct.unpack_from("<Q", fadt, 132)[0] == 0
    )  # no FACS
    port = struct.pack("<BBBBQ", 1, 8, 0, 1, POWER_PORT)  # SystemIO, 8 bits, byte access
    assert fadt[116:128] == port and fadt[128] == 1  # RESET_REG, RESET_VALUE
    assert fadt[244:256] == port and fadt[256:268] == port  # SLEEP_CONTROL, SLEEP_STATUS
    bare = build_fadt(BASE, None)  # a machine without the device: no registers, no RESET_REG_SUP
    assert bare[116:128] == bytes(12) and bare[244:268] == bytes(24)
    assert not struct.unpack_from("<I", bare, 112)[0] & 1 << 10


def test_fadt_dsdt_above_4_gib_has_only_x_dsdt():
    fadt = build_fadt(0x1_0000_0000)
    assert struct.unpack_from("<I", fadt, 40)[0] == 0
    assert struct.unpack_from("<Q", fadt, 140)[0] == 0x1_0000_0000


@needs_iasl
def test_iasl_reads_every_fadt_field(tmp_path):
    t = build_tables(SEGMENTS, BASE)
    fadt = t.tables["FACP"]
    fields, output = disassemble(tmp_path, "FACP", fadt)
    assert "checksum" not in output.lower() and "warning" not in output.lower()
    assert fields == expected_fadt(fadt, t.addresses["DSDT"])
    text, _ = disassemble_text(tmp_path, "FACP", fadt)
    assert decoded_bits(text) == EXPECTED_FADT_BITS


def expected_madt(madt: bytes, cpus: int) -> tuple[list[tuple[int, int, str, str]], list[tuple[str, int]]]:
    fields = header_fields(madt, "APIC", "Multiple APIC Description Table (MADT)", revision=6)
    fields += [(36, 4, "Local Apic Address", "FEE00000"), (40, 4, "Flags (decoded below)", "00000000")]
    bits = [("PC-AT Compatibility", 0)]
    at = 44
    for cpu in range(cpus):
        fields += [
            (at, 1, "Subtable Type", "00 [Processor Local APIC]"),
            (at + 1, 1, "Length", "08"),
            (at + 2, 1, "Processor ID", f"{cpu:02X}"),
            (at + 3, 1, "Local Apic ID", f"{cpu:02X}"),
            (at + 4, 4, "Flags (decoded below)", "00000001"),
        ]
        bits += [("Processor Enabled", 1), ("Runtime Online Capable", 0)]
        at += 8
    fields += [
        (at, 1, "Subtable Type", "01 [I/O APIC]"),
        (at + 1, 1, "Length", "0C"),
        (at + 2, 1, "I/O Apic ID", f"{cpus:02X}"),
        (at + 3, 1, "Reserved", "00"),
        (at + 4, 4, "Address", "FEC00000"),
        (at + 8, 4, "Interrupt", "00000000"),
    ]
    at += 12
    # Interrupt source overrides: ISA IRQ 0 -> GSI 2 (conforming), IRQ 9 -> GSI 9 level, active high.
    for irq, gsi, flags in ((0, 2, 0), (9, 9, 0xD)):
        fields += [
            (at, 1, "Subtable Type", "02 [Interrupt Source Override]"),
            (at + 1, 1, "Length", "0A"),
            (at + 2, 1, "Bus", "00"),
            (at + 3, 1, "Source", f"{irq:02X}"),
            (at + 4, 4, "Interrupt", f"{gsi:08X}"),
            (at + 8, 2, "Flags (decoded below)", f"{flags:04X}"),
        ]
        bits += [("Polarity", flags & 3), ("Trigger Mode", flags >> 2 & 3)]
        at += 10
    assert at == len(madt)
    return fields, bits


@needs_iasl
@pytest.mark.parametrize("cpus", [1, 3, 254])
def test_iasl_reads_every_madt_field(tmp_path, cpus):
    t = build_tables(SEGMENTS, BASE, cpus=cpus)
    madt = t.tables["APIC"]
    assert byte_sum(madt) == 0 and len(madt) == 44 + 8 * cpus + 12 + 2 * 10
    fields, output = disassemble(tmp_path, "APIC", madt)
    assert "checksum" not in output.lower() and "warning" not in output.lower()
    expected_fields, expected_bits = expected_madt(madt, cpus)
    assert fields == expected_fields
    text, _ = disassemble_text(tmp_path, "APIC", madt)
    assert decoded_bits(text) == expected_bits


@pytest.mark.parametrize("cpus", [0, 255])
def test_madt_cpu_count_limits(cpus):
    with pytest.raises(ValueError, match="vCPUs"):
        build_madt(cpus)
