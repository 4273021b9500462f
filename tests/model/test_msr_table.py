"""MsrTable: MSR ownership by single index and range, and KVM's unknown-MSR rule (pure)."""

from __future__ import annotations

import pytest

from pcihole.hv.model.msr import MsrFault, MsrTable, MsrValue


def test_single_and_range_handlers_get_their_index_and_who_asks():
    table = MsrTable()
    seen = []
    table.register(0x1B, read=lambda i, host: 0xFEE00900, owner="lapic")
    table.register(
        0x800,
        0x8FF,
        read=lambda i, host: i * 2,
        write=lambda i, v, host: seen.append((i, v, host)),
        owner="x2apic",
    )
    assert table.read(0x1B, host=False) == 0xFEE00900
    assert table.read(0x830, host=True) == 0x1060
    table.write(0x80B, 0, host=False)
    assert seen == [(0x80B, 0, False)]


def test_unknown_msr_faults_both_ways():
    table = MsrTable()
    table.register(0x800, 0x8FF, read=lambda i, host: 0, owner="x2apic")
    for index in (0x7FF, 0x900, 0x4B564D00):
        with pytest.raises(MsrFault):
            table.read(index, host=False)
        with pytest.raises(MsrFault):
            table.write(index, 1, host=True)


def test_read_only_by_default():
    table = MsrTable()
    table.register(0xFE, read=lambda i, host: 0x508, owner="mtrr")
    with pytest.raises(MsrFault):
        table.write(0xFE, 0, host=False)


def test_overlap_is_refused_naming_both_owners():
    table = MsrTable()
    table.register(0x800, 0x8FF, read=lambda i, host: 0, owner="x2apic")
    with pytest.raises(ValueError, match=r"kvmclock.*x2apic.*0x800, 0x8ff"):
        table.register(0x8FF, 0x900, read=lambda i, host: 0, owner="kvmclock")
    table.register(0x900, read=lambda i, host: 0, owner="next")  # adjacent is fine


def test_unregister():
    table = MsrTable()
    h = table.register(0x10, read=lambda i, host: 1, owner="tsc")
    table.unregister(h)
    with pytest.raises(MsrFault):
        table.read(0x10, host=False)


def test_msr_value_refuses_reserved_bits():
    reg = MsrValue(0, writable=0xFF)
    reg.write(0x48, 0x3, False)
    assert reg.read(0x48, False) == 3
    with pytest.raises(MsrFault):
        reg.write(0x48, 0x100, False)


def test_replace_takes_over_a_default_handler():
    table = MsrTable()
    table.register(0x1B, read=lambda i, host: 1, owner="vcpu apic_base")
    table.register(0x1B, read=lambda i, host: 2, owner="lapic", replace=True)
    assert table.read(0x1B, host=False) == 2
    assert table.handler(0x1B).owner == "lapic"
