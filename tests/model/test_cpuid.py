"""The model's CPUID: KVM's lookup rules (kvm_cpuid), the table a guest sees, against /dev/kvm with
the same KVM_SET_CPUID2 table; and every feature the model offers runs on its engine."""

from __future__ import annotations

import struct

import pytest

from pcihole.hv import exits
from pcihole.hv.model.cpuid import (
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    CpuidEntry,
    CpuidTable,
    cpuid2_from,
    supported_cpuid,
    supported_entries,
)
from pcihole.hv.uapi import KvmCap

from .system_guest import RESULTS, run_system_guest

SIG = 1


def intel_table(*extra: CpuidEntry) -> CpuidTable:
    vendor = struct.unpack("<III", b"GenuineIntel")  # EBX, EDX, ECX order in the string
    basic = CpuidEntry(0, 0, 0, 0xD, vendor[0], vendor[2], vendor[1])
    return CpuidTable(
        [basic, CpuidEntry(0xD, 0, SIG, 1, 2, 3, 4), CpuidEntry(0xD, 1, SIG, 5, 6, 7, 8), *extra]
    )


def test_significant_index_selects_the_subleaf():
    t = intel_table()
    assert t.lookup(0xD, 1) == (5, 6, 7, 8)
    assert t.lookup(0xD, 2) == (0, 0, 0, 0)  # in range, absent: zeros


def test_index_ignored_where_not_significant():
    t = intel_table(CpuidEntry(2, 0, 0, 9, 9, 9, 9))
    assert t.lookup(2, 5) == (9, 9, 9, 9)


def test_out_of_range_leaf_is_the_highest_basic_leaf_with_its_index():
    t = intel_table(CpuidEntry(0x80000000, 0, 0, 0x80000001, 0, 0, 0))
    assert t.lookup(0xE, 1) == (5, 6, 7, 8)
    assert t.lookup(0x80000002, 0) == (1, 2, 3, 4)
    assert t.lookup(0x40000000, 0) == (1, 2, 3, 4)  # no hypervisor class at all
    assert t.lookup(0x80000001, 0) == (0, 0, 0, 0)  # in range of its class: zeros


def test_amd_out_of_range_is_zeros():
    vendor = struct.unpack("<III", b"AuthenticAMD")
    t = CpuidTable(
        [CpuidEntry(0, 0, 0, 0xD, vendor[0], vendor[2], vendor[1]), CpuidEntry(0xD, 0, SIG, 1, 2, 3, 4)]
    )
    assert t.lookup(0x20, 0) == (0, 0, 0, 0)


def test_topology_leaf_passes_cl_and_the_x2apic_id():
    t = intel_table(CpuidEntry(0xB, 0, SIG, 1, 1, 0x100, 7), CpuidEntry(0xB, 1, SIG, 0, 1, 0x201, 7))
    assert t.lookup(0xB, 5) == (0, 0, 5, 7)


def test_supported_table_is_kvm_shaped(model_hv):
    assert model_hv.check_extension(KvmCap.KVM_CAP_EXT_CPUID) == 1
    table = CpuidTable.from_cpuid2(model_hv.get_supported_cpuid())
    assert struct.pack("<III", *table.lookup(0x40000000, 0)[1:]) == b"KVMKVMKVM\0\0\0"
    assert table.lookup(0x40000000, 0)[0] == 0x40000001
    for e in supported_entries():
        assert bool(e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) == (e.function in (4, 7, 0xB, 0xD))


# (leaf, subleaf) pairs covering each rule: present, indexed absent, out of range per class.
# (16 of them: the guest's results area holds 256 bytes.)
QUERIES = [(0, 0), (1, 0), (4, 2), (4, 9), (7, 0), (7, 1), (0xB, 5), (0xD, 1), (0xE, 0), (0x20, 1),
           (0x40000000, 0), (0x40000001, 0), (0x40000002, 0), (0x80000008, 0), (0x80000009, 1),
           (0xC0000000, 0)]  # fmt: skip


def cpuid_body() -> str:
    lines = []
    for i, (leaf, sub) in enumerate(QUERIES):
        lines += [f"mov ${leaf:#x}, %eax", f"mov ${sub:#x}, %ecx", "cpuid"]
        for j, reg in enumerate(("eax", "ebx", "ecx", "edx")):
            lines.append(f"mov %{reg}, {RESULTS + 16 * i + 4 * j}")
    return "\n".join(lines)


def run_cpuid_guest(hv, table):
    return run_system_guest(hv, cpuid_body(), [], setup=lambda vcpu: vcpu.set_cpuid2(table))


def answers(run) -> list[tuple[int, ...]]:
    return [struct.unpack_from("<4I", run.results, 16 * i) for i in range(len(QUERIES))]


def test_guest_cpuid_is_the_table(model_hv):
    table = supported_cpuid()
    run = run_cpuid_guest(model_hv, table)
    assert run.exits == [exits.Hlt()]
    expected = CpuidTable.from_cpuid2(table)
    got = dict(zip(QUERIES, answers(run), strict=True))
    for (leaf, sub), regs in got.items():
        if leaf == 1:  # OSXSAVE follows CR4 (clear here), APIC follows IA32_APIC_BASE (enabled)
            assert regs[2] == expected.lookup(1, 0)[2] and regs[3] & (1 << 9)
        else:
            assert regs == expected.lookup(leaf, sub), hex(leaf)


# This host's KVM (PVM) answers leaves 1, 7 and 0xd with the host's own features whatever the
# table says (its guests see host features CPUID does not report: machine/host_quirks.py), so
# the comparison leaves those out; the rules are compared through leaves PVM leaves alone.
PVM_OVERRIDDEN = (1, 7, 0xD)


def differential_table():
    """The model's table with 0xb (topology) as the highest basic leaf and distinctive subleaves,
    so that every out-of-range query lands on an entry PVM does not override."""
    base = [e for e in supported_entries() if e.function != 0xB]
    topology = [CpuidEntry(0xB, 0, SIG, 1, 1, 0x100, 0), CpuidEntry(0xB, 1, SIG, 4, 1, 0x201, 0)]
    entries = [CpuidEntry(0, 0, 0, 0xB, *e.regs[1:]) if e.function == 0 else e for e in base] + topology
    return cpuid2_from(entries)


@pytest.mark.kvm
def test_guest_cpuid_matches_kvm_with_the_same_table(kvm_hv, model_hv):
    """KVM_SET_CPUID2 with the same table on both: kvm_cpuid's answers, rule for rule (exact
    entries, absent subleaves, out of range per class, the 0xb passthrough)."""
    table = differential_table()
    kvm, model = run_cpuid_guest(kvm_hv, table), run_cpuid_guest(model_hv, table)
    if kvm.exits[-1] != exits.Hlt():
        pytest.skip(f"this host's KVM (PVM) does not run the CPUID guest to its HLT: {kvm.exits[-1]}")
    compared = [i for i, (leaf, _) in enumerate(QUERIES) if leaf not in PVM_OVERRIDDEN]
    got_model, got_kvm = answers(model), answers(kvm)
    assert {QUERIES[i]: got_model[i] for i in compared} == {QUERIES[i]: got_kvm[i] for i in compared}
    assert got_model[QUERIES.index((0x20, 1))] == (4, 1, 0x201, 0)  # the rule was exercised


def test_set_cpuid2_refuses_more_than_kvm_max_cpuid_entries(model_hv):
    from pcihole.hv import uapi

    vm = model_hv.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        big = uapi.cpuid2_with(uapi.KVM_MAX_CPUID_ENTRIES + 1)()
        big.nent = uapi.KVM_MAX_CPUID_ENTRIES + 1
        with pytest.raises(OSError) as e:
            vcpu.set_cpuid2(big)
        assert e.value.errno == 7  # E2BIG, as kvm_vcpu_ioctl_set_cpuid2
    finally:
        vm.close()


@pytest.mark.kvm
def test_guest_cpuid_before_set_cpuid2_matches_kvm(kvm_hv, model_hv):
    """No KVM_SET_CPUID2: kvm_cpuid finds no entry, and with no leaf 0 no out-of-range rule
    applies either, so every leaf reads zeros (the model's engine has a CPU model of its own
    that must not show through). PVM still answers its overridden leaves with host features."""
    kvm = run_system_guest(kvm_hv, cpuid_body(), [])
    model = run_system_guest(model_hv, cpuid_body(), [])
    assert model.exits == [exits.Hlt()]
    assert answers(model) == [(0, 0, 0, 0)] * len(QUERIES)
    if kvm.exits[-1] != exits.Hlt():
        pytest.skip(f"this host's KVM (PVM) does not run the CPUID guest to its HLT: {kvm.exits[-1]}")
    compared = [i for i, (leaf, _) in enumerate(QUERIES) if leaf not in PVM_OVERRIDDEN]
    assert [answers(model)[i] for i in compared] == [answers(kvm)[i] for i in compared]
