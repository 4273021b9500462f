"""Memslot changes and kicks from another thread while the vCPU runs, on the model and on /dev/kvm.

KVM installs new memslots at once (kvm_set_memslot swaps them and zaps the old mappings): a vCPU in
guest mode sees a change at its next access, without any exit. The guest below spins reading one
page and never exits by itself; a host thread switches the page between two backings, through a
deleted state in which a read exits as MMIO (docs/kvm-memslot-rules.md), and times how
long the guest takes to see each backing.
"""

from __future__ import annotations

import threading
import time

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import exits
from tests.backends import BACKENDS
from tests.guest_runner import RAM_BYTES, close_run, run_guest

SLOT_GPA = 0x200000
SEEN = 0x2000  # the guest stores the last value it read here
BAD = 0x2004  # ... and counts values that are none of the three below
STOP = 0x2008  # the host sets this to end the guest
MMIO_VALUE = 0x4F494D4D  # what the run loop answers for a read of the deleted slot ("MMIO")
CYCLES = 20

SPINNER = f"""
    xor %ebp, %ebp
1:  mov {SLOT_GPA:#x}, %eax
    mov %eax, {SEEN:#x}
    cmp $0x41414141, %eax
    je 2f
    cmp $0x42424242, %eax
    je 2f
    cmp ${MMIO_VALUE:#x}, %eax
    je 2f
    incl {BAD:#x}
2:  cmpl $0, {STOP:#x}
    je 1b
    hlt
"""


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
def test_a_guest_that_never_exits_sees_each_memslot_change_at_once(hypervisor):
    backings = [HostMapping.anonymous(0x1000) for _ in range(2)]
    for mapping, byte in zip(backings, b"AB", strict=True):
        mapping.write(0, bytes([byte]) * 0x1000)
    values = [int.from_bytes(bytes([b]) * 4, "little") for b in b"AB"]
    run = run_guest(
        hypervisor,
        SPINNER,
        setup=lambda vm: vm.set_user_memory_region(1, 0, SLOT_GPA, 0x1000, backings[0].addr),
        max_exits=0,
    )
    vm, vcpu, ram = run.vm, run.vcpu, run.ram
    latencies: list[float] = []
    errors: list[BaseException] = []

    def seen() -> int:
        return int.from_bytes(ram.read(SEEN, 4), "little")

    def host() -> None:
        try:
            for i in range(1, CYCLES + 1):
                vm.set_user_memory_region(1, 0, SLOT_GPA, 0, 0)  # delete: reads exit as MMIO
                time.sleep(0.002)
                t0 = time.monotonic()
                vm.set_user_memory_region(1, 0, SLOT_GPA, 0x1000, backings[i % 2].addr)
                while seen() != values[i % 2]:
                    if time.monotonic() - t0 > 5:
                        raise TimeoutError(f"the guest did not see change {i} within 5 s")
                    time.sleep(0.0002)
                latencies.append(time.monotonic() - t0)
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            ram.write(STOP, (1).to_bytes(4, "little"))

    thread = threading.Thread(target=host, name="memslots")
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            exit_ = vcpu.run()
            if isinstance(exit_, exits.Hlt):
                break
            assert exit_ == exits.MmioRead(SLOT_GPA, 4), exit_
            vcpu.complete_read(MMIO_VALUE.to_bytes(4, "little"))
        else:
            pytest.fail("the guest did not stop")
        bad = int.from_bytes(ram.read(BAD, 4), "little")
    finally:
        thread.join()
        close_run(run)
        for mapping in backings:
            mapping.close()
    assert not errors, errors
    assert bad == 0
    assert len(latencies) == CYCLES  # every change was seen (the 5 s bound only catches a hang)
    print(f"slowest change seen after {max(latencies) * 1e3:.1f} ms")


def test_the_guest_only_ever_sees_a_backing_or_an_mmio_read(model_hv):
    """Same guest, counted: no read of the slot returns anything else while it is replaced."""
    backings = [HostMapping.anonymous(0x1000) for _ in range(2)]
    for mapping, byte in zip(backings, b"AB", strict=True):
        mapping.write(0, bytes([byte]) * 0x1000)
    run = run_guest(
        model_hv,
        SPINNER,
        setup=lambda vm: vm.set_user_memory_region(1, 0, SLOT_GPA, 0x1000, backings[0].addr),
        max_exits=0,
    )
    stop = threading.Event()

    def host() -> None:
        i = 0
        t_end = time.monotonic() + 1.0
        while not stop.is_set() and time.monotonic() < t_end:
            i += 1
            run.vm.set_user_memory_region(1, 0, SLOT_GPA, 0, 0)
            time.sleep(0.001 if i % 2 else 0)  # half of the deletes last long enough to be read
            run.vm.set_user_memory_region(1, 0, SLOT_GPA, 0x1000, backings[i % 2].addr)
            time.sleep(0.0005)
        run.ram.write(STOP, (1).to_bytes(4, "little"))

    thread = threading.Thread(target=host, name="memslots")
    thread.start()
    mmio_reads = 0
    try:
        while True:
            exit_ = run.vcpu.run()
            if isinstance(exit_, exits.Hlt):
                break
            assert exit_ == exits.MmioRead(SLOT_GPA, 4), exit_
            mmio_reads += 1
            run.vcpu.complete_read(MMIO_VALUE.to_bytes(4, "little"))
        assert int.from_bytes(run.ram.read(BAD, 4), "little") == 0
        assert mmio_reads > 0, "the guest never read the slot while it was deleted"
    finally:
        stop.set()
        thread.join()
        close_run(run)
        for mapping in backings:
            mapping.close()


COUNTER = 0x3000
# Enough iterations for many kicks to land while the guest runs (the patched engine runs this loop
# at a few ns an iteration); the kicker stops after KICKS interruptions so the loop then ends.
N = 20_000_000
KICKS = 50


def test_kick_from_another_thread_stops_between_instructions(model_hv):
    """A kicked vCPU stops at an instruction boundary: no `incl` runs twice (uc_emu_stop would rerun
    the interrupted instruction), and every run() after a kick returns Interrupted."""
    source = f"mov ${N}, %ecx\n1: incl {COUNTER:#x}\n dec %ecx\n jnz 1b\n hlt"
    run = run_guest(model_hv, source, max_exits=0)
    done = threading.Event()
    kicks = [0]

    def kicker() -> None:
        while not done.is_set() and interrupted < KICKS:
            run.vcpu.kick()
            kicks[0] += 1
            time.sleep(0.0002)

    interrupted = 0
    thread = threading.Thread(target=kicker, name="kicker")
    thread.start()
    try:
        while True:
            exit_ = run.vcpu.run()
            if isinstance(exit_, exits.Hlt):
                break
            assert isinstance(exit_, exits.Interrupted), exit_
            interrupted += 1
    finally:
        done.set()
        thread.join()
    try:
        assert interrupted > 10, "the kicks did not interrupt the guest"
        assert int.from_bytes(run.ram.read(COUNTER, 4), "little") == N
        assert run.vcpu.get_regs().rcx == 0
    finally:
        close_run(run)


def test_ram_size_is_enough():
    assert SLOT_GPA >= RAM_BYTES
