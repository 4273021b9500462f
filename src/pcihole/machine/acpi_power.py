"""The ACPI sleep/reset register of a hardware-reduced platform: one I/O port, as cloud-hypervisor's
AcpiShutdownDevice (devices/src/acpi.rs) at port 0x600.

The FADT (acpi/fadt.py) names this port three times: SLEEP_CONTROL_REG, SLEEP_STATUS_REG and
RESET_REG (RESET_VALUE 1). What Linux writes:
- power-off: acpi_power_off() -> acpi_enter_sleep_state(S5) -> acpi_hw_extended_sleep()
  (drivers/acpi/acpica/hwesleep.c) writes WAK_STS (0x80) to SLEEP_STATUS, then
  ((SLP_TYP << 2) & 0x1c) | SLP_EN (0x20) to SLEEP_CONTROL: 0x34 for \\_S5's SLP_TYP 5;
- reboot: acpi_reboot() (drivers/acpi/reboot.c) writes RESET_VALUE to RESET_REG.
Any other value (WAK_STS, other sleep types) is ignored: pcihole has no S1-S4.
"""

from __future__ import annotations

from pcihole.acpi.fadt import ACPI_POWER_PORT

ACPI_POWER_SIZE = 1
SLP_EN = 1 << 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x1C
SLP_TYP_S5 = 5
SLEEP_S5 = (SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN  # 0x34
RESET_VALUE = 1

__all__ = ["ACPI_POWER_PORT", "AcpiPowerDevice", "GuestPoweredOff", "GuestReset"]


class GuestPoweredOff(Exception):
    """The guest entered S5 (soft off): the run ended well."""


class GuestReset(Exception):
    """The guest asked for a reset through the ACPI reset register."""


class AcpiPowerDevice:
    def read(self, addr: int, size: int) -> bytes:
        # SLEEP_STATUS reads WAK_STS clear: nothing ever wakes this machine from a sleep state.
        return bytes(size)

    def write(self, addr: int, data: bytes) -> None:
        value = data[0]
        if value & SLP_EN and (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == SLP_TYP_S5:
            raise GuestPoweredOff(f"the guest wrote {value:#x} (SLP_TYP 5 | SLP_EN) to SLEEP_CONTROL")
        if value == RESET_VALUE:
            raise GuestReset(f"the guest wrote {value:#x} to the ACPI reset register")
