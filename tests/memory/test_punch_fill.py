"""Hole contract point 5: a function's page punched out of the hole and given back, repeatedly, while
the guest reads it (and its neighbours) in a loop. Every read must return all-ones or the
function's bytes, never anything else, whatever the memslot operations are doing at that moment.

On kvm the vCPU thread sits in KVM_RUN with the GIL released while a host thread changes memslots
(KVM allows it: a DELETE installs an INVALID slot and waits for the vCPU's SRCU read side).
"""

from __future__ import annotations

import threading
import time

import pytest

from pcihole.hv import exits
from tests.backends import BACKEND_STRATEGIES
from tests.guest_runner import ECAM, MiB, answer_mmio
from tests.memory.fake_function import FakeFunction

PAGE = ECAM + 7 * MiB + 0x18000  # bus 7, device 3, function 0
NEIGHBOUR_BELOW = PAGE - 0x1000
NEIGHBOUR_ABOVE = PAGE + 0x1000
FAR = ECAM + 200 * MiB
RESULTS = 0x9000  # guest stores: count all-ones, count function, count bad, last bad value, bad addr
STOP = 0xA000  # the host sets this to 1 when it has done enough punch/fill cycles
CYCLES = 25
# The reader writes to the POST port every 256 iterations. A real guest exits often; the model
# backend needs it, because it applies memslot changes to its Unicorn CPU only when the vCPU is
# stopped (at the next exit), where KVM applies them while the vCPU is in guest mode.
POST_PORT = 0x80

READER = f"""
    xor %ebp, %ebp
    xor %r9, %r9
    xor %r10, %r10
    xor %r11, %r11
    xor %r12, %r12
    xor %r13, %r13
    mov $0xffffffff, %r14d
    mov $FN, %r15d
loop:
    mov ${PAGE}, %edi
    mov (%rdi), %eax
    cmp %r14d, %eax
    je is_ff
    cmp %r15d, %eax
    je is_fn
    inc %r11
    mov %rax, %r12
    mov %rdi, %r13
    jmp neighbours
is_ff:
    inc %r9
    jmp neighbours
is_fn:
    inc %r10
neighbours:
    mov ${NEIGHBOUR_BELOW}, %edi
    call check_ff
    mov ${NEIGHBOUR_ABOVE}, %edi
    call check_ff
    mov ${FAR}, %edi
    call check_ff
    inc %ebp
    test $0xff, %ebp
    jnz 2f
    out %al, $0x80  # a periodic exit, as any real guest makes (see POST_PORT)
2:  cmpq $0, {STOP}
    je loop
    mov %r9, {RESULTS}
    mov %r10, {RESULTS + 8}
    mov %r11, {RESULTS + 16}
    mov %r12, {RESULTS + 24}
    mov %r13, {RESULTS + 32}
    hlt
check_ff:
    mov (%rdi), %eax
    cmp %r14d, %eax
    je 1f
    inc %r11
    mov %rax, %r12
    mov %rdi, %r13
1:  ret
"""


@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_reads_see_all_ones_or_the_function_while_a_page_is_punched_and_filled(
    table_guest, backend, strategy
):
    fn = FakeFunction()
    fn_value = int.from_bytes(fn.bytes_at(0, 4), "little")
    g = table_guest(backend, strategy, source=READER.replace("$FN", f"${fn_value:#x}"))
    mem = g.mem
    slots_before = mem.stats().memslots
    g.start()

    done = threading.Event()
    toggles = [0]
    errors: list[BaseException] = []

    def hotplug() -> None:
        try:
            while not done.is_set() and toggles[0] < CYCLES:
                seen = mem.view.counters.mmio_reads
                mem.punch_page(PAGE, fn, "07:03.0")
                # Stay punched until the guest has read the function at least once (or 2 s), so
                # that every cycle exercises both states whatever the backend's speed.
                give_up = time.monotonic() + 2
                while mem.view.counters.mmio_reads == seen and time.monotonic() < give_up:
                    time.sleep(0.001)
                time.sleep(0.002)
                mem.fill_page(PAGE)
                toggles[0] += 1
                time.sleep(0.003)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            mem.write_guest(STOP, (1).to_bytes(8, "little"))

    host = threading.Thread(target=hotplug, name="hotplug")
    host.start()
    counted = {"MmioRead": 0, "MmioWrite": 0}
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            e = g.vcpu.run()
            mem.view.coalesced(g.vcpu.drain_coalesced_mmio())
            if isinstance(e, exits.Hlt):
                break
            if isinstance(e, exits.IoOut) and e.port == POST_PORT:
                continue
            assert isinstance(e, exits.MmioRead | exits.MmioWrite), e
            counted[type(e).__name__] += 1
            assert answer_mmio(mem.view, g.vcpu, e)
        else:
            pytest.fail("the reader did not finish in time")
    finally:
        done.set()
        host.join()
    assert not errors, errors
    ff, fnc, bad, bad_value, bad_addr = (
        int.from_bytes(mem.read_guest(RESULTS + 8 * i, 8), "little") for i in range(5)
    )
    assert bad == 0, f"{bad} bad reads, last {bad_value:#x} at {bad_addr:#x}"
    assert toggles[0] == CYCLES
    assert ff > 0 and fnc > 0, (ff, fnc)
    # The map is back as it started: the hole is whole again, with as many slots as before.
    assert mem.stats().memslots == slots_before
    assert mem.memory_map.punched() == []
