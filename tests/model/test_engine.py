"""The model's patched engine (engine/patches, docs/model-system-cpu.md): it is the one loaded, and what
each patch changes still behaves as on /dev/kvm.

- the dirty bitmap (stores to a page go fast once it holds no translated code): a guest that rewrites
  code it already ran, through the same mapping, through another virtual alias of the page, and just
  ahead of itself in the running block, runs the new code, as on kvm;
- memory hooks bounded at TLB fill: the MMIO and dirty-log exits of tests/model/test_differential_*
  (e.g. test_differential_access_split.py: accesses arrive unsplit, as on kvm) run on it;
- the boundary request: an interrupt waiting for RFLAGS.IF costs Python a call when IF opens, not one
  per block (tests/model/test_interrupt_waiting_for_if.py checks it is still taken after STI's
  shadow, and that a kick and a memslot change are still seen meanwhile).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pcihole.hv import exits
from pcihole.hv.model.boundary_hook import engine_requests_boundaries
from pcihole.hv.model.engine import loaded_engine

from .system_guest import PAGE_TABLES, RESULTS, run_system_guest
from .test_halt_with_interrupt_source import Guest, address_of, fire_and_notify, port_out

PATCHES = Path(__file__).parents[2] / "engine" / "patches"


def test_the_model_runs_on_the_patched_engine():
    engine = loaded_engine()
    assert engine.patched, engine.describe()
    assert list(engine.patches) == sorted(p.name for p in PATCHES.glob("*.patch"))
    assert engine_requests_boundaries()


# A function at 0x50000 (`mov $imm32, %eax; ret`) is called, rewritten, called again: through a second
# virtual page the guest maps onto the same physical page (linear 0x60000, its PTE rewritten; written
# before the function is first translated, so that its TLB entry took the fast path then), through the
# mapping it runs from, then an instruction just ahead in the running block.
FUNCTION, ALIAS = 0x50000, 0x60000
SELF_MODIFYING = f"""
    movq ${FUNCTION | 7:#x}, {PAGE_TABLES + 0x3000 + (ALIAS >> 12) * 8:#x}
    invlpg {ALIAS:#x}
    movb $0xb8, {FUNCTION:#x}
    movl $1, {ALIAS + 1:#x}
    movb $0xc3, {FUNCTION + 5:#x}
    mov ${FUNCTION:#x}, %ebx
    mov $100, %ecx
2:  call *%rbx              # often enough to be translated and chained
    dec %ecx
    jnz 2b
    mov %eax, {RESULTS:#x}
    movl $2, {ALIAS + 1:#x}
    call *%rbx
    mov %eax, {RESULTS + 4:#x}
    movl $3, {FUNCTION + 1:#x}
    call *%rbx
    mov %eax, {RESULTS + 8:#x}
    movb $4, 3f + 1
3:  mov $7, %eax
    mov %eax, {RESULTS + 12:#x}
"""


@pytest.mark.kvm
def test_self_modifying_code_matches_kvm(kvm_hv, model_hv):
    model = run_system_guest(model_hv, SELF_MODIFYING, [])
    assert model.exits == [exits.Hlt()]
    assert struct.unpack_from("<4I", model.results) == (1, 2, 3, 4)
    kvm = run_system_guest(kvm_hv, SELF_MODIFYING, [])
    assert kvm.exits == model.exits
    assert kvm.results == model.results
    assert kvm.regs == model.regs


def test_an_interrupt_waiting_for_if_calls_python_when_if_opens(model_hv):
    """20,000 blocks with IF clear and an interrupt waiting, then STI: the interrupt is taken after
    STI's shadow, and the vCPU's IF question is asked a handful of times, not at every block."""
    loop = "mov $20000, %ecx\n 1: dec %ecx\n jnz 1b\n"
    body = f"cli\n out %al, $0x81\n {loop} sti\n nop\n out %al, $0x80"
    guest = Guest(model_hv, body)
    vcpu = guest.vcpu
    asked = []
    still_waiting = vcpu._still_waiting_for_if  # the boundary hook's `unchanged`, bound at engine build

    def counted(uc) -> bool:
        asked.append(1)
        return still_waiting(uc)

    vcpu._still_waiting_for_if = counted
    try:
        assert port_out(vcpu.run()) == 0x81
        fire_and_notify(guest)
        assert port_out(vcpu.run()) == 0x80
        assert guest.handled() == (address_of(body, "out %al, $0x80"), 1)
        assert 1 <= len(asked) < 100
    finally:
        guest.close()
