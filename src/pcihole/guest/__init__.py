"""The embedded scan guest: a PVH ELF that finds ECAM (ACPI MCFG) and probes it the way Linux does.

``IMAGE_PATH`` is the built image shipped as package data; see README.md in this folder for how it is
built, what it does and the report it leaves in memory and on the serial port. ``report`` parses both.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_PATH = Path(__file__).resolve().parent / "scan.elf"
REPORT_SYMBOL = "pcihole_report"


def image_bytes() -> bytes:
    """The bytes of the packaged scan guest."""
    return IMAGE_PATH.read_bytes()
