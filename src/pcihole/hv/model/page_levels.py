"""The largest page KVM may map a gfn with, from the memslot alone (x86 lpage_info.disallow_lpage).

kvm_alloc_memslot_metadata (arch/x86/kvm/x86.c) fills lpage_info per level (2M, 1G):
- the first large page is disallowed if the slot does not start on a large-page boundary, and the
  last one if the slot does not end on one;
- every large page is disallowed if gfn and userspace address are not congruent modulo the
  large page ("If the gfn and userspace address are not aligned wrt each other, disable large
  page support for this slot");
- [PATCH v2 2/3]: "Also, disable large page support for KVM_MEM_PCI_HOLE slots".
kvm_mmu_max_mapping_level then walks down from the largest level to the first allowed one. Host
page sizes (host_pfn_mapping_level) are not modelled: this is the memslot's bound.
"""

from __future__ import annotations

from pcihole.hv.model.memslots import Memslot, MemslotTable

# arch/x86/include/asm/pgtable_types.h: enum pg_level.
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G


def kvm_pages_per_hpage(level: int) -> int:
    """KVM_PAGES_PER_HPAGE: 4K pages in one page of `level`."""
    return 1 << ((level - 1) * 9)


def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int:
    """arch/x86/kvm/mmu.h gfn_to_index."""
    shift = (level - 1) * 9
    return (gfn >> shift) - (base_gfn >> shift)


def disallow_lpage(slot: Memslot, gfn: int, level: int) -> bool:
    """lpage_info_slot(gfn, slot, level)->disallow_lpage, as kvm_alloc_memslot_metadata left it."""
    pages = kvm_pages_per_hpage(level)
    if slot.pci_hole or (slot.base_gfn ^ (slot.userspace_addr >> 12)) & (pages - 1):
        return True
    index = gfn_to_index(gfn, slot.base_gfn, level)
    lpages = gfn_to_index(slot.base_gfn + slot.npages - 1, slot.base_gfn, level) + 1
    if index == 0 and slot.base_gfn & (pages - 1):
        return True
    return index == lpages - 1 and bool((slot.base_gfn + slot.npages) & (pages - 1))


def max_mapping_level(table: MemslotTable, gfn: int) -> int:
    """kvm_mmu_max_mapping_level over the memslot metadata: PG_LEVEL_4K, _2M or _1G.

    A gfn no slot maps is PG_LEVEL_4K, as kvm_mmu_hugepage_adjust answers for "!slot".
    """
    slot = table.find_gfn(gfn)
    if slot is None:
        return PG_LEVEL_4K
    for level in range(KVM_MAX_HUGEPAGE_LEVEL, PG_LEVEL_4K, -1):
        if not disallow_lpage(slot, gfn, level):
            return level
    return PG_LEVEL_4K
