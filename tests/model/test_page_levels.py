"""max_mapping_level: kvm_alloc_memslot_metadata's disallow_lpage, plus the seed's PCI_HOLE rule."""

from __future__ import annotations

from pcihole.hv.model.page_levels import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from pcihole.hv.proposed import KVM_MEM_PCI_HOLE

G = 1 << 30
M2 = 2 << 20


def gfn(gpa: int) -> int:
    return gpa >> 12


def test_aligned_slot_allows_1g(model_hv):
    vm = model_hv.create_vm()
    vm.set_user_memory_region(0, 0, 4 * G, 2 * G, 8 * G)
    assert vm.max_mapping_level(gfn(4 * G)) == PG_LEVEL_1G
    assert vm.max_mapping_level(gfn(6 * G - 1)) == PG_LEVEL_1G


def test_hva_misaligned_at_1g_caps_at_2m_and_at_2m_caps_at_4k(model_hv):
    vm = model_hv.create_vm()
    vm.set_user_memory_region(0, 0, 4 * G, 2 * G, 8 * G + M2)
    assert vm.max_mapping_level(gfn(5 * G)) == PG_LEVEL_2M
    vm.set_user_memory_region(1, 0, 16 * G, 2 * G, 32 * G + 0x1000)
    assert vm.max_mapping_level(gfn(17 * G)) == PG_LEVEL_4K


def test_unaligned_slot_edges_lose_their_large_pages(model_hv):
    vm = model_hv.create_vm()
    start = 4 * G + 0x1000  # starts 1 page into a 2M (and 1G) page; hva congruent
    vm.set_user_memory_region(0, 0, start, 3 * G, 8 * G + 0x1000)
    end = start + 3 * G
    assert vm.max_mapping_level(gfn(start)) == PG_LEVEL_4K  # first 2M and first 1G disallowed
    assert vm.max_mapping_level(gfn(start + M2)) == PG_LEVEL_2M  # inside the first 1G page
    assert vm.max_mapping_level(gfn(5 * G + 5)) == PG_LEVEL_1G  # a middle 1G page
    assert vm.max_mapping_level(gfn(end - 1)) == PG_LEVEL_4K  # last 2M and 1G disallowed


def test_pci_hole_is_4k_everywhere_and_no_slot_is_4k(model_hv):
    vm = model_hv.create_vm()
    vm.set_user_memory_region(0, KVM_MEM_PCI_HOLE, 4 * G, 4 * G, 0)
    assert {vm.max_mapping_level(gfn(4 * G + i * G // 2)) for i in range(8)} == {PG_LEVEL_4K}
    assert vm.max_mapping_level(gfn(64 * G)) == PG_LEVEL_4K
