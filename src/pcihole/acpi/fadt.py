"""The FADT (signature "FACP"), revision 6: a hardware-reduced ACPI platform (ACPI 6.5 §5.2.9, 276 bytes).

Offsets are those of struct acpi_table_fadt in ACPICA's include/acpi/actbl.h. Everything not set here
is zero. What Linux reads, and why each value:

- Flags (offset 112), §5.2.9 Table "Fixed ACPI Description Table Fixed Feature Flags":
  HW_REDUCED_ACPI (bit 20): there is no PM1/GPE/SCI/PM-timer hardware, and then no FACS either
  (acpi_tb_parse_fadt / acpi_tb_convert_fadt skip it; FIRMWARE_CTRL and X_FIRMWARE_CTRL stay 0).
  On x86, acpi_reduced_hw_init() -> acpi_generic_reduced_hw_init() (arch/x86/kernel/acpi/boot.c)
  makes timer_init a no-op and the legacy PIC null_legacy_pic: Linux times with the LAPIC (TSC
  deadline) and kvm-clock, and ignores the in-kernel PIT and 8259s that the kvm backend creates.
  PWR_BUTTON and SLP_BUTTON (bits 4, 5) are set: "if the system does not have a power button, this
  value would be 1" (there are no fixed-feature buttons). WBINVD (bit 0): the x86 vCPU has it.
  RESET_REG_SUP (bit 10) stays clear: see RESET_REG below.
- DSDT (offset 40) and X_DSDT (offset 140): both the DSDT's address (the 32-bit one only when it is
  below 4 GiB). ACPICA's acpi_tb_select_address() prefers X_DSDT and warns only if both are set and
  differ.
- IAPC_BOOT_ARCH (offset 109), read by acpi_parse_fadt():
  bit 0 LEGACY_DEVICES set: COM1 at 0x3F8 is a user-visible ISA-style device (x86-64 Linux only uses
  the bit to keep PnP BIOS off);
  bit 1 8042 clear: there is no keyboard controller, so with revision >= 2 acpi_parse_fadt() sets
  x86_platform.legacy.i8042 = X86_LEGACY_I8042_FIRMWARE_ABSENT and the i8042 driver does not poke
  ports 0x60/0x64 (each poke would be a port exit answered with all-ones). Reboot's BOOT_KBD step
  still writes 0xFE to port 0x64, which nothing answers: boot Linux with `reboot=t` (triple fault ->
  KVM_EXIT_SHUTDOWN, which the run loop reports);
  bit 2 VGA Not Present: x86_platform.legacy.no_vga = 1, nothing probes 0x3C0/0xA0000;
  bit 5 CMOS RTC Not Present: x86_platform.legacy.rtc = 0, add_rtc_cmos() registers no rtc_cmos (time
  comes from kvmclock, arch/x86/kernel/kvmclock.c);
  bit 3 MSI Not Supported clear: nothing stops MSI but the missing irqchip (madt.py), and setting it
  would make pci_no_msi() permanent for the boot; bit 4 PCIe ASPM Controls clear.
- RESET_REG (116) + RESET_VALUE (128), SLEEP_CONTROL_REG (244), SLEEP_STATUS_REG (256): one 8-bit
  SystemIO register at port 0x600 for all three, as cloud-hypervisor's create_facp_table() does
  (machine/acpi_power.py answers it): RESET_REG_SUP (bit 10) is set and RESET_VALUE is 1, so
  drivers/acpi/reboot.c acpi_reboot() writes 1 there; acpi_sleep_init() registers acpi_power_off
  because in hardware-reduced mode S5 needs both sleep registers (acpi_sleep_state_supported()), and
  acpi_hw_extended_sleep() writes 0x34 (SLP_TYP 5 | SLP_EN) to SLEEP_CONTROL. Without them Linux's
  power-off would only halt, and with an in-kernel LAPIC a HLT never reaches the VMM.
  `build_fadt(dsdt, power_port=None)` leaves them zero (and RESET_REG_SUP clear) for a machine
  without the device.
- Hypervisor Vendor Identity (offset 268, added by FADT revision 6 in ACPI 6.0): "PCIHOLE_".
"""

from __future__ import annotations

import struct

from .sdt_header import SDT_HEADER_SIZE, build_sdt

FADT_SIGNATURE = b"FACP"
FADT_REVISION = 6  # ACPI 6.0 and later
FADT_MINOR_REVISION = 5  # ACPI 6.5 (offset 131, FADT Minor Version)
FADT_LENGTH = 276  # §5.2.9: revision 6 ends with the Hypervisor Vendor Identity at 268

# Offsets within the table (struct acpi_table_fadt).
DSDT_OFFSET = 40
PREFERRED_PM_PROFILE_OFFSET = 45
IAPC_BOOT_ARCH_OFFSET = 109
FLAGS_OFFSET = 112
RESET_REG_OFFSET = 116
MINOR_REVISION_OFFSET = 131
X_DSDT_OFFSET = 140
SLEEP_CONTROL_OFFSET = 244
SLEEP_STATUS_OFFSET = 256
HYPERVISOR_ID_OFFSET = 268

PM_PROFILE_UNSPECIFIED = 0

# IA-PC Boot Architecture Flags (§5.2.9.3).
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
BOOT_NO_VGA = 1 << 2
BOOT_NO_MSI = 1 << 3
BOOT_PCIE_ASPM_CONTROLS = 1 << 4
BOOT_NO_CMOS_RTC = 1 << 5
IAPC_BOOT_ARCH = BOOT_LEGACY_DEVICES | BOOT_NO_VGA | BOOT_NO_CMOS_RTC

# Fixed Feature Flags (§5.2.9).
FLAG_WBINVD = 1 << 0
FLAG_PWR_BUTTON = 1 << 4
FLAG_SLP_BUTTON = 1 << 5
FLAG_RESET_REG_SUP = 1 << 10
FLAG_HW_REDUCED_ACPI = 1 << 20
FLAGS = FLAG_WBINVD | FLAG_PWR_BUTTON | FLAG_SLP_BUTTON | FLAG_HW_REDUCED_ACPI

RESET_VALUE_OFFSET = 128
# Generic Address Structure (§5.2.3.2): space id, bit width, bit offset, access size, address.
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
RESET_VALUE = 1
#: The I/O port of the sleep/reset register (cloud-hypervisor's choice); machine/acpi_power.py answers it.
ACPI_POWER_PORT = 0x600

HYPERVISOR_VENDOR_ID = b"PCIHOLE_"
FOUR_GIB = 1 << 32


def build_fadt(dsdt_gpa: int, power_port: int | None = None) -> bytes:
    body = bytearray(FADT_LENGTH - SDT_HEADER_SIZE)

    def put(fmt: str, offset: int, value: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - SDT_HEADER_SIZE, value)

    put("<I", DSDT_OFFSET, dsdt_gpa if dsdt_gpa < FOUR_GIB else 0)
    put("<B", PREFERRED_PM_PROFILE_OFFSET, PM_PROFILE_UNSPECIFIED)
    put("<H", IAPC_BOOT_ARCH_OFFSET, IAPC_BOOT_ARCH)
    put("<I", FLAGS_OFFSET, FLAGS | (FLAG_RESET_REG_SUP if power_port is not None else 0))
    if power_port is not None:
        port = GAS.pack(GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, power_port)
        for offset in (RESET_REG_OFFSET, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET):
            put(f"<{GAS.size}s", offset, port)
        put("<B", RESET_VALUE_OFFSET, RESET_VALUE)
    put("<B", MINOR_REVISION_OFFSET, FADT_MINOR_REVISION)
    put("<Q", X_DSDT_OFFSET, dsdt_gpa)
    put("<8s", HYPERVISOR_ID_OFFSET, HYPERVISOR_VENDOR_ID)
    return build_sdt(FADT_SIGNATURE, FADT_REVISION, bytes(body))
