"""Our FADT, DSDT, MADT and MCFG loaded by acpiexec (acpica-tools): ACPICA's interpreter, the code
Linux runs in drivers/acpi/acpica/, builds the namespace, evaluates each object Linux asks for, and
converts each _CRS to resources the way acpi_walk_resources() does for acpi_pci_root_add() and
is_acpi_reserved()."""

import re
import shutil
import subprocess

import pytest

from pcihole.acpi import build_tables, write_tables
from tests.acpi.acpi_helpers import Seg

ACPIEXEC = shutil.which("acpiexec")
needs_acpiexec = pytest.mark.skipif(ACPIEXEC is None, reason="acpiexec (acpica-tools) is not installed")

SEGMENTS = [Seg(0, 0xE0000000, 0, 255), Seg(1, 0xD0000000, 0, 63), Seg(3, 0xC0000000, 16, 31)]
BRIDGES = ["PCI0", "PCI1", "PCI3"]
INTEGER = re.compile(r"Evaluating (\S+)\n.*?\n\s+\[Integer\] = ([0-9A-F]+)\n")
RESOURCE = re.compile(r"^\[\d\d\] (.+?)\n((?:\s+[^\n:]+ : [^\n]*\n)*)", re.M)
PROPERTY = re.compile(r"^\s+([^\n:]+?) : ([^\n]*)$", re.M)


def acpiexec(tmp_path, tables, commands: list[str]) -> str:
    names = [p.name for p in write_tables(tables, tmp_path) if p.stem in ("FACP", "DSDT", "APIC", "MCFG")]
    run = subprocess.run(
        [ACPIEXEC, "-b", "; ".join(commands), *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    # Drop ACPICA's resource-conversion trace lines.
    return "\n".join(line for line in output.splitlines() if not re.match(r"\s+rs(calc|list)-", line)) + "\n"


def resources(output: str, device: str) -> list[tuple[str, dict[str, str]]]:
    section = output.split(f"Device: {device}\n", 1)[1].split("Resource Conversion Comparison", 1)[0]
    return [(m.group(1), dict(PROPERTY.findall(m.group(2)))) for m in RESOURCE.finditer(section)]


@needs_acpiexec
def test_acpica_loads_the_tables_and_sees_what_linux_needs(tmp_path):
    t = build_tables(SEGMENTS, 0xE0000)
    commands = [f"evaluate \\_SB.{b}.{n}" for b in BRIDGES for n in ("_HID", "_CID", "_SEG", "_BBN", "_UID")]
    commands += ["evaluate \\_SB.MBRD._HID"]
    commands += [f"resources \\_SB.{d}" for d in [*BRIDGES, "MBRD"]]
    out = acpiexec(tmp_path, t, commands)

    for signature in ("FACP", "DSDT", "APIC", "MCFG"):
        assert re.search(rf"ACPI: {signature} 0x[0-9A-F]+ [0-9A-F]+ \(v0\d PCIHOL PHOL{signature}", out), (
            signature
        )
    # Hardware-reduced: ACPICA installs no FACS and sets up no GPE blocks.
    assert "ACPI: FACS" not in out and "General Purpose Events" not in out
    assert "1 ACPI AML tables successfully acquired and loaded" in out
    assert " 4 Devices" in out  # the three bridges and MBRD
    # The only failure is acpiexec's own _SRS probe: our devices have no _SRS.
    assert [line for line in out.splitlines() if "AE_" in line or "rror" in line] == [
        "AcpiSetCurrentResources failed: AE_NOT_FOUND"
    ] * 4

    values = {path: int(v, 16) for path, v in INTEGER.findall(out)}
    for seg, bridge in zip(SEGMENTS, BRIDGES, strict=True):
        at = f"\\_SB.{bridge}"
        assert values[f"{at}._HID"] == 0x080AD041  # EISAID("PNP0A08")
        assert values[f"{at}._CID"] == 0x030AD041  # EISAID("PNP0A03"), what acpi_pci_root matches
        assert (values[f"{at}._SEG"], values[f"{at}._BBN"], values[f"{at}._UID"]) == (
            seg.id,
            seg.start_bus,
            seg.id,
        )
    assert values["\\_SB.MBRD._HID"] == 0x020CD041  # EISAID("PNP0C02")

    for seg, bridge, window in zip(SEGMENTS, BRIDGES, t.pci_windows, strict=True):
        (bus_kind, bus), (io_kind, io), (mem_kind, mem), (mem64_kind, mem64), (end, _) = resources(
            out, f"\\_SB.{bridge}"
        )
        assert io_kind == "16-Bit WORD Address Space Resource" and io["Resource Type"] == "I/O Range"
        assert io["Consumer/Producer"] == "ResourceProducer"
        assert 0x1000 <= int(io["Address Minimum"], 16) < int(io["Address Maximum"], 16) <= 0xFFFF
        assert (
            mem64_kind == "64-Bit QWORD Address Space Resource" and mem64["Resource Type"] == "Memory Range"
        )
        assert mem64["Consumer/Producer"] == "ResourceProducer"
        assert int(mem64["Address Minimum"], 16) >= 1 << 32
        assert bus_kind == "16-Bit WORD Address Space Resource" and bus["Resource Type"] == "Bus Number Range"
        assert bus["Consumer/Producer"] == "ResourceProducer"
        assert (int(bus["Address Minimum"], 16), int(bus["Address Maximum"], 16)) == (
            seg.start_bus,
            seg.end_bus,
        )
        assert mem_kind == "32-Bit DWORD Address Space Resource" and mem["Resource Type"] == "Memory Range"
        assert mem["Consumer/Producer"] == "ResourceProducer"  # a window: IORESOURCE_WINDOW in Linux
        assert window is not None
        assert (int(mem["Address Minimum"], 16), int(mem["Address Length"], 16)) == (window.base, window.size)
        assert end == "EndTag Resource"
    fixed = resources(out, "\\_SB.MBRD")
    assert fixed[-1][0] == "EndTag Resource"
    assert [(kind, int(r["Address"], 16), int(r["Address Length"], 16)) for kind, r in fixed[:-1]] == [
        (
            "32-Bit Fixed Memory Range Resource",
            s.ecam_base + (s.start_bus << 20),
            (s.end_bus - s.start_bus + 1) << 20,
        )
        for s in SEGMENTS
    ]
