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
RESULTS = (
    0x9000  # u64s: reads of PAGE that saw all-ones, saw the function, bad reads, last bad value, bad addr
)
SAW_FILL, SAW_FUNCTION = RESULTS, RESULTS + 8  # counted in memory as the guest goes: the host waits on them
STOP = 0xA000  # the host sets this to 1 when it has done enough punch/fill cycles
CYCLES = 25
#: Only bounds a hang. Each phase of a cycle lasts until the guest has read PAGE in that state (counts,
#: not times): with fixed sleeps a loaded machine could let every 3 ms filled phase pass unread (ff == 0).
HANG_BOUND = 600.0
# The reader writes to the POST port every 256 iterations. A real guest exits often; the model
# backend needs it, because it applies memslot changes to its Unicorn CPU only when the vCPU is
# stopped (at the next exit), where KVM applies them while the vCPU is in guest mode.
POST_PORT = 0x80

READER = f"""
    xor %ebp, %ebp
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
    incq {SAW_FILL}
    jmp neighbours
is_fn:
    incq {SAW_FUNCTION}
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

    def count(counter: int) -> int:
        return int.from_bytes(mem.read_guest(counter, 8), "little")

    def until_the_guest_saw(counter: int, before: int, state: str) -> None:
        """Wait until the guest has read PAGE in the state just made (any speed: a count, not a time)."""
        while count(counter) == before and not done.is_set():
            if time.monotonic() > hang_at:
                raise AssertionError(f"the guest never read PAGE {state} (cycle {toggles[0]})")
            time.sleep(0.001)

    hang_at = time.monotonic() + HANG_BOUND

    def hotplug() -> None:
        try:
            while not done.is_set() and toggles[0] < CYCLES:
                before = count(SAW_FUNCTION)
                mem.punch_page(PAGE, fn, "07:03.0")
                until_the_guest_saw(SAW_FUNCTION, before, "punched")
                time.sleep(0.002)  # some more reads in this state (any number will do)
                before = count(SAW_FILL)
                mem.fill_page(PAGE)
                until_the_guest_saw(SAW_FILL, before, "filled")
                toggles[0] += 1
                time.sleep(0.003)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            mem.write_guest(STOP, (1).to_bytes(8, "little"))

    host = threading.Thread(target=hotplug, name="hotplug")
    host.start()
    counted = {"MmioRead": 0, "MmioWrite": 0}
    try:
        while time.monotonic() < hang_at:
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
            pytest.fail(f"the reader hung (cycle {toggles[0]})")
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
