"""Answering a test guest's MMIO exits from the memory map, as the machine does.

The machine puts each ECAM window on its MMIO bus (machine/ecam_window.py EcamWindow), which asks
the memory map's view: `view.read` / `view.write`, and completes the read with the answer. Tests
that run a guest on bare GuestMemory (no machine) take the same path through `answer_mmio`.
"""

from __future__ import annotations

from pcihole.hv import exits


def answer_mmio(view, vcpu, exit_) -> bool:
    """Answer an MmioRead / MmioWrite from `view` (a MapView); False if it is not in the map."""
    if isinstance(exit_, exits.MmioRead):
        data = view.read(exit_.addr, exit_.size)
        if data is None:
            return False
        vcpu.complete_read(data)
        return True
    if isinstance(exit_, exits.MmioWrite):
        return view.write(exit_.addr, exit_.data)
    return False
