"""The example machines (examples/*.toml), as tests load them for a backend.

gpu-server's 64-bit window (eight 128 GiB GPU BARs, 2 TiB at 2 TiB) lies beyond the model CPU's 40
physical address bits, so pcihole refuses that machine on the model (machine/address_width.py,
tests/machine/test_address_width.py). Tests of its fabric that need the model get the same fabric
with 8 GiB GPU BARs, which fit.
"""

from __future__ import annotations

from pathlib import Path

from pcihole.machine.machinefile import MachineFile, loads

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BEYOND_THE_MODEL = "gpu-server"
GPU_BAR = "size = 0x2000000000\n"  # 128 GiB
SMALLER_GPU_BAR = "size = 0x200000000\n"  # 8 GiB


def load_for(path: Path, backend: str) -> MachineFile:
    """The example at `path`; for the model, gpu-server with 8 GiB GPU BARs."""
    text = path.read_text()
    if backend == "model" and path.stem == BEYOND_THE_MODEL:
        assert text.count(GPU_BAR) == 8
        text = text.replace(GPU_BAR, SMALLER_GPU_BAR)
    return loads(text, str(path))
