"""RDTSC / RDTSCP and IA32_TSC on the model vCPU read its TscClock (tsc.py), not the host's TSC."""

from __future__ import annotations

import struct

from pcihole.hv import exits
from pcihole.hv.model.cpu_msrs import MSR_IA32_TSC, MSR_TSC_AUX

from .system_guest import RESULTS, run_system_guest

START = 10**15  # far above anything the host's TSC or the clock's own count would give


def read_tsc(slot: int, insn: str = "rdtsc") -> str:
    return f"""
    mov $-1, %rax
    mov $-1, %rdx
    {insn}
    mov %rax, {RESULTS + 16 * slot}
    mov %rdx, {RESULTS + 16 * slot + 8}
    """


def value(q, slot: int) -> int:
    lo, hi = q[2 * slot], q[2 * slot + 1]
    assert lo >> 32 == 0 and hi >> 32 == 0  # RDTSC clears the upper halves of RAX and RDX
    return hi << 32 | lo


def test_rdtsc_counts_from_the_value_kvm_set_msrs_gave(model_hv):
    def setup(vcpu):
        vcpu.set_msrs({MSR_IA32_TSC: START, MSR_TSC_AUX: 0x1234})

    body = (
        read_tsc(0)
        + read_tsc(1)
        + read_tsc(2, "rdtscp")
        + f"mov %rcx, {RESULTS + 0x80}\n"
        + f"mov ${MSR_IA32_TSC}, %ecx\n xor %eax, %eax\n mov $2, %edx\n wrmsr\n"  # TSC = 2 << 32
        + read_tsc(3)
    )
    run = run_system_guest(model_hv, body, [], setup=setup)
    assert run.exits == [exits.Hlt()]
    q = struct.unpack("<32Q", run.results)
    t0, t1, t2, t3 = (value(q, i) for i in range(4))
    assert START <= t0 < t1 < t2 < START + 60 * 10**9  # 1 GHz: a minute of host time at most
    assert q[0x80 // 8] == 0x1234  # RDTSCP's ECX: IA32_TSC_AUX
    assert 2 << 32 <= t3 < (2 << 32) + 60 * 10**9


def test_guest_tsc_follows_host_time(model_hv):
    """Two reads in two runs, a known host pause between them: the TSC moved at least that much."""
    import time

    pause_ns = 20_000_000
    stamps: list[int] = []

    def on_exit(vcpu, exit_, i):
        if i == 0:
            stamps.append(time.monotonic_ns())
            time.sleep(pause_ns / 1e9)
            return True
        return False

    run = run_system_guest(model_hv, read_tsc(0) + "hlt\n" + read_tsc(1), [], on_exit=on_exit)
    q = struct.unpack("<32Q", run.results)
    assert value(q, 1) - value(q, 0) >= pause_ns  # 1 GHz: one tick per ns
