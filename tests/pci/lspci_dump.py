"""Run the real lspci (pciutils) on pcihole's configuration spaces, through a dump file (lspci -F),
the format `lspci -xxxx` writes and pciutils' lib/dump.c reads: "SSSS:BB:DD.F name" then
"offset: 16 hex bytes" lines, a blank line between functions."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pcihole.pci.host_bridge import HostBridge

LSPCI = shutil.which("lspci")
needs_lspci = pytest.mark.skipif(LSPCI is None, reason="lspci (pciutils) is not installed")


def write_dump(bridge: HostBridge, path: Path) -> Path:
    lines = []
    for info in bridge.devices():
        fn = bridge.function(info.bdf)
        assert fn is not None
        lines.append(f"{info.bdf} {info.name or info.kind}")
        for offset in range(0, len(fn.config), 16):
            lines.append(f"{offset:02x}: " + " ".join(f"{b:02x}" for b in fn.config.read(offset, 16)))
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def lspci(dump: Path, *args: str) -> str:
    assert LSPCI is not None
    run = subprocess.run([LSPCI, "-F", str(dump), *args], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout
