"""ECAM decode/encode against the PCIe 6.0 Table 7-1 bit layout, written out independently here."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcihole.pci import ecam

buses = st.integers(0, 255)
devices = st.integers(0, 31)
functions = st.integers(0, 7)
registers = st.integers(0, 4095)


def test_field_positions_match_table_7_1():
    # A[27:20] bus, A[19:15] device, A[14:12] function, A[11:0] register.
    assert ecam.BUS_SHIFT == 20
    assert ecam.DEVICE_SHIFT == 15
    assert ecam.FUNCTION_SHIFT == 12
    assert ecam.CONFIG_SPACE_SIZE == 4096
    assert ecam.BUS_WINDOW_SIZE == 1 << 20
    assert ecam.SEGMENT_WINDOW_SIZE == 256 << 20


@given(buses, devices, functions, registers)
def test_encode_is_the_linux_formula(bus, device, function, register):
    # arch/x86/pci/mmconfig_64.c: PCI_MMCFG_BUS_OFFSET(bus) | (devfn << 12) | reg
    devfn = device << 3 | function
    assert ecam.encode(bus, device, function, register) == (bus << 20) | (devfn << 12) | register


@given(buses, devices, functions, registers)
def test_decode_inverts_encode(bus, device, function, register):
    decoded = ecam.decode(ecam.encode(bus, device, function, register))
    assert decoded == (bus, device, function, register)
    assert decoded.devfn == device * 8 + function


@given(st.integers(0, (256 << 20) - 1))
def test_encode_inverts_decode(offset):
    assert ecam.encode(*ecam.decode(offset)) == offset


@pytest.mark.parametrize("offset", [-1, 256 << 20, 1 << 40])
def test_decode_rejects_offsets_outside_a_segment(offset):
    with pytest.raises(ValueError, match="outside"):
        ecam.decode(offset)


@pytest.mark.parametrize(
    "args", [(256, 0, 0, 0), (0, 32, 0, 0), (0, 0, 8, 0), (0, 0, 0, 4096), (-1, 0, 0, 0)]
)
def test_encode_rejects_fields_out_of_range(args):
    with pytest.raises(ValueError):
        ecam.encode(*args)
