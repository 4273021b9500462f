"""What the holes cost the host, measured rather than summed.

`hole_backing_bytes` counts the *distinct* host pages behind the holes (docs/design.md, "Interfaces
that are checked"): for a memfd its allocated blocks (fstat st_blocks * 512), for a private buffer its
resident pages (mincore(2) over that mapping). Summing Rss over mappings would be wrong: 4096
mappings of one 64 KiB memfd show 256 MiB of Rss, and per-mapping Pss rounds to 0 kB.
Beside it: the memslots in use, the host mappings the holes own and the process's VMA count, and
VmPTE (the host page tables, which grow by ~512 KiB for a fully probed 256 MiB hole with ro-alias
and ro-filled alike).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import asdict, dataclass, field

from pcihole.host.mman import PAGE_SIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_bytes(addr: int, size: int) -> int:
    """Bytes of [addr, addr + size) resident in memory, by mincore(2) (bit 0 of each page's byte)."""
    npages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    vec = (ctypes.c_ubyte * npages)()
    if _libc.mincore(addr, npages * PAGE_SIZE, vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore({addr:#x}, {size:#x}): {os.strerror(err)}")
    return sum(b & 1 for b in bytes(vec)) * PAGE_SIZE


def proc_status_kb(field_name: str, path: str = "/proc/self/status") -> int:
    """A `Name:   N kB` line of /proc/self/status, in kB."""
    with open(path) as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field_name} not in {path}")


def vm_pte_bytes() -> int:
    return proc_status_kb("VmPTE") * 1024


def process_mappings() -> int:
    """Lines in /proc/self/maps: the VMAs this process owns (bounded by vm.max_map_count)."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


@dataclass
class ExitCounters:
    """Exits and ring entries the memory layer answered, by kind."""

    hole_reads: int = 0  # MmioRead in a hole, answered with the fill
    hole_writes_discarded: int = 0  # MmioWrite in a discard-hole (no zone, ring full, or a gap)
    hole_writes_coalesced: int = 0  # ring entries in hole zones (writes that did not exit)
    hole_writes_trapped: int = 0  # writes handed to a trap handler (exits or ring entries)
    mmio_reads: int = 0  # MmioRead answered by an Mmio region's handler
    mmio_writes: int = 0
    memory_reads: int = 0  # exits in RAM/ROM (only in a slot gap), answered from the backing
    memory_writes: int = 0
    unclaimed: int = 0  # exits in no region (returned to the caller)


@dataclass
class MemoryStats:
    strategy: str
    memslots: int
    hole_memslots: int
    hole_backing_bytes: int
    hole_mappings: int
    process_mappings: int
    vm_pte_bytes: int
    coalesced_zones: int
    fill_devices: int
    exits: ExitCounters = field(default_factory=ExitCounters)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


__all__ = [
    "ExitCounters",
    "MemoryStats",
    "proc_status_kb",
    "process_mappings",
    "resident_bytes",
    "vm_pte_bytes",
]
