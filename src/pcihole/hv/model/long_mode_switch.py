"""`LongModeSwitch`: a 32-bit engine the guest took into long mode, replaced by an engine of the new mode.

Unicorn fixes an engine's mode at uc_open, but the CPU under it follows the guest (cpu.live_mode):
Linux's PVH entry (pvh_start_xen) starts in 32-bit protected mode, sets CR0.PG with EFER.LME and
far-jumps to a 64-bit CS, and the UC_MODE_32 engine goes on running 64-bit code, with register ids
that reach only the low halves and an emu_start that writes the start address with 32 bits. KVM
has no such step: its vCPU is one CPU in every mode. The model stops the 32-bit engine at the next
instruction boundary (or at an exception, which is between two instructions) and moves its whole
CPU state into a UC_MODE_64 engine (cpu.carry_state), which runs the guest from there.

Three things make this more than a context copy, each measured on unicorn 2.1.4:
- the state is saved where the engine stops, not after emu_start returns: the engine then faults on
  its end address, (1 << 64) - 1 cut to 0xffffffff, which overwrites CR2 at least;
- the arithmetic flags are made concrete first (stop): a context saved in a block hook carries
  TCG's lazy ones;
- an exception the 32-bit engine met after the switch cannot be delivered by it (its register ids
  no longer reach RIP / RSP): it is kept (`deferred`) for the new engine to deliver first thing.

A 64-bit engine whose guest leaves long mode is followed at the next emu_start instead (vcpu.py's
_prepare_engine): only 32-bit engines are watched from callbacks.
"""

from __future__ import annotations

from collections.abc import Callable

from unicorn import Uc
from unicorn.unicorn_py3.unicorn import UcContext
from unicorn.x86_const import UC_X86_REG_EFLAGS

from pcihole.hv.model import cpu
from pcihole.hv.model.engine_state import EngineState
from pcihole.hv.model.interrupts import Event
from pcihole.hv.model.vcpu_state import Request


class LongModeSwitch:
    """One vCPU's switch from a 32-bit engine in long mode to a 64-bit one (Request.MODE_CHANGE)."""

    def __init__(self, requests: set[Request], request_boundary: Callable[[], None]) -> None:
        # The vCPU's requests (the same set), and how to stop it at the next instruction boundary.
        self._requests = requests
        self._request_boundary = request_boundary
        #: An exception met by a 32-bit engine after the guest took it into long mode, delivered by
        #: the 64-bit engine that replaces it (Request.MODE_CHANGE) before it runs guest code.
        self.deferred: Event | None = None
        # The CPU state (uc_context) of a 32-bit engine in long mode where it was stopped for an
        # engine of the new mode: the state after emu_start returns is not it (the engine faults
        # on its end address, (1 << 64) - 1 cut to 0xffffffff, which overwrites CR2 at least).
        self._context: UcContext | None = None

    def changed(self, uc: Uc, mode: cpu.CpuMode | None, state: EngineState | None) -> bool:
        """From a callback: True if the guest took this 32-bit engine into long mode
        (cpu.live_mode); the vCPU then stops at the next instruction boundary for an engine of the
        new mode (Request.MODE_CHANGE). Only 32-bit engines are checked: a 64-bit guest that
        leaves long mode is followed at the next emu_start (_prepare_engine)."""
        if mode is not cpu.CpuMode.PROTECTED_32:
            return False
        if Request.MODE_CHANGE not in self._requests:
            if cpu.live_mode(uc, mode, state) is mode:
                return False
            self._requests.add(Request.MODE_CHANGE)
            self._request_boundary()
        return True

    def stop(self, uc: Uc, deferred: Event | None = None) -> None:
        """From a callback at an instruction boundary (or an exception's): keep the CPU state as it
        is here for the engine of the new mode, and stop. `deferred`: the exception met here, for
        the new engine to deliver."""
        if deferred is not None:
            self.deferred = deferred
        # The arithmetic flags live in TCG's lazy cc_src / cc_op until something computes them:
        # measured, a context saved in a block hook carries stale ones (RFLAGS read 0x2 in the new
        # engine, 0x86 in the old). Reading and writing RFLAGS through the API stores them in
        # env->eflags (cpu_load_eflags, CC_OP_EFLAGS) first.
        uc.reg_write(UC_X86_REG_EFLAGS, uc.reg_read(UC_X86_REG_EFLAGS))
        self._context = uc.context_save()
        uc.emu_stop()

    def take_deferred(self) -> Event | None:
        """The exception the new engine delivers before it runs guest code, if any (once)."""
        event, self.deferred = self.deferred, None
        return event

    def carry(self, old: Uc, new: Uc, state: EngineState, layout_ok: bool) -> None:
        """Give the fresh engine `new` the CPU state `old` was stopped with: the whole CPU state, the
        engine-kept MSRs and FPU with it (cpu.carry_state). `state` is `new`'s, usable where
        `layout_ok`."""
        context, self._context = self._context, None
        cpu.carry_state(old, new, context)
        if layout_ok:
            # old_exception is not architectural: QEMU resets it when an exception is
            # delivered (x86_cpu_do_interrupt), which Unicorn never calls; a stale value
            # would turn the next contributory fault into #DF (check_exception).
            state.load()
            state.clear_old_exception()
            state.store()
