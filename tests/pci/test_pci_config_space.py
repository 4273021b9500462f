"""Write masks: RO, RW and RW1C bits, checked bit by bit against the rule in PCIe 6.0 §7.4."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcihole.pci.config_space import ConfigSpace

byte = st.integers(0, 255)


def _bit_model(old, rw, w1c, value):
    """Per bit: RW takes the written bit, RW1C clears where 1 is written, anything else keeps its value."""
    out = 0
    for bit in range(8):
        m = 1 << bit
        new = value & m if rw & m else old & m
        if w1c & m and value & m:
            new = 0
        out |= new
    return out


@given(byte, byte, byte, byte)
def test_one_byte_write_follows_the_bit_model(old, rw, w1c, value):
    c = ConfigSpace()
    c.init_int(0x40, 1, old)
    c.init_writable(0x40, 1, rw)
    c.init_write_1_to_clear(0x40, 1, w1c)
    c.write(0x40, bytes([value]))
    assert c.read_int(0x40, 1) == _bit_model(old, rw, w1c, value)


@given(
    st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4)
)
def test_multi_byte_writes_apply_masks_per_byte(old, rw, value):
    c = ConfigSpace()
    c.data[0x100:0x104] = old
    c.writable[0x100:0x104] = rw
    c.write(0x100, value)
    assert c.read(0x100, 4) == bytes(_bit_model(o, m, 0, v) for o, m, v in zip(old, rw, value, strict=True))
    # The neighbours are untouched.
    assert c.read(0xFC, 4) == b"\0" * 4 and c.read(0x104, 4) == b"\0" * 4


def test_read_only_by_default():
    c = ConfigSpace()
    c.init_int(0, 4, 0x12345678)
    c.write(0, b"\xff\xff\xff\xff")
    assert c.read_int(0, 4) == 0x12345678


def test_rw1c_status_bits_clear_only_where_one_is_written():
    c = ConfigSpace()
    c.init_int(0x06, 2, 0xA010)  # two error bits and a read-only capability bit
    c.init_write_1_to_clear(0x06, 2, 0xF900)
    c.write(0x06, (0x2000).to_bytes(2, "little"))
    assert c.read_int(0x06, 2) == 0x8010
    c.write(0x06, (0x0000).to_bytes(2, "little"))
    assert c.read_int(0x06, 2) == 0x8010
    c.write(0x06, (0xFFFF).to_bytes(2, "little"))
    assert c.read_int(0x06, 2) == 0x0010


def test_set_bits_is_hardware_and_ignores_masks():
    c = ConfigSpace()
    c.set_bits(0x1E, 2, 0x2000)
    assert c.read_int(0x1E, 2) == 0x2000
    c.clear_bits(0x1E, 2, 0x2000)
    assert c.read_int(0x1E, 2) == 0


@pytest.mark.parametrize("offset,size", [(-1, 1), (4095, 2), (4096, 1), (0, 0)])
def test_accesses_outside_the_space_are_refused(offset, size):
    with pytest.raises(ValueError):
        ConfigSpace().read(offset, size)
