"""How one guest MMIO access to ECAM is cut into configuration-space accesses.

PCIe 6.0 §7.2.2.1 requires software to issue ECAM accesses that are naturally aligned and do not
cross a DW boundary; what happens otherwise is implementation specific. We decide like QEMU 7.2:
its pcie_mmcfg_ops (hw/pci/pcie_host.c) declare no .valid/.impl sizes, so the memory core's
memory_access_size() (softmmu/physmem.c) cuts the buffer of a KVM_EXIT_MMIO into pieces that are
at most 4 bytes and naturally aligned ("Bound the maximum access by the alignment of the address"),
and dispatches each piece to pcie_mmcfg_data_read/write on its own. A piece therefore never crosses a
dword, hence never a function's 4 KiB page, and every byte of a misaligned or page-crossing access
gets the value of the function (or hole) it lands in. An aligned 8-byte access becomes two dword
halves, low half first, as QEMU does (max access size 4).
"""

from __future__ import annotations

from collections.abc import Iterator

MAX_PIECE = 4  # a configuration request carries at most one DW (PCIe 6.0 §2.2.7: Length = 1)


def split_access(address: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield (address, size) pieces, each naturally aligned and at most 4 bytes, covering the access.

    The piece size is memory_access_size(): the largest power of two that is <= 4, <= what is left,
    and <= the alignment of the address.
    """
    if size <= 0:
        raise ValueError(f"access size must be positive, not {size}")
    end = address + size
    while address < end:
        left = end - address
        alignment = address & -address if address else MAX_PIECE
        piece = min(MAX_PIECE, alignment)
        while piece > left:  # pow2floor of what is left
            piece >>= 1
        yield address, piece
        address += piece
