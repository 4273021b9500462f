"""Cutting an MMIO access into configuration requests, as QEMU's memory_access_size() does."""

from hypothesis import given
from hypothesis import strategies as st

from pcihole.pci.access import split_access


def test_aligned_accesses_are_one_piece_up_to_a_dword():
    assert list(split_access(0x1000, 1)) == [(0x1000, 1)]
    assert list(split_access(0x1002, 2)) == [(0x1002, 2)]
    assert list(split_access(0x1004, 4)) == [(0x1004, 4)]


def test_an_aligned_qword_is_two_dword_halves_low_first():
    assert list(split_access(0x2000, 8)) == [(0x2000, 4), (0x2004, 4)]


def test_misaligned_accesses_follow_address_alignment():
    # memory_access_size(): min(4, addr & -addr, pow2floor(left)).
    assert list(split_access(0x1001, 4)) == [(0x1001, 1), (0x1002, 2), (0x1004, 1)]
    assert list(split_access(0x0FFE, 4)) == [(0x0FFE, 2), (0x1000, 2)]
    assert list(split_access(0x0FFF, 2)) == [(0x0FFF, 1), (0x1000, 1)]
    assert list(split_access(0x1003, 8)) == [(0x1003, 1), (0x1004, 4), (0x1008, 2), (0x100A, 1)]


@given(st.integers(0, 1 << 40), st.integers(1, 8))
def test_pieces_cover_the_access_exactly_and_never_cross_a_dword(address, size):
    pieces = list(split_access(address, size))
    expected = address
    for piece_address, piece_size in pieces:
        assert piece_address == expected  # contiguous, in order
        assert piece_size in (1, 2, 4)
        assert piece_address % piece_size == 0  # naturally aligned
        assert piece_address // 4 == (piece_address + piece_size - 1) // 4  # within one dword
        expected += piece_size
    assert expected == address + size
