"""`LiveSregs`: KVM_SET_SREGS on a vCPU that has an engine, between two runs or during an exit.

KVM loads the new special registers at once (__set_sregs) and the guest goes on from where it was:
an IN's data still reaches RAX (complete_fast_pio_in), an MMIO access is completed, the next
instruction runs with the new segments. The model keeps the engine and its whole CPU state and
loads the new ones into it (special_registers.load_sregs), in place, rather than building an
engine from KVM_GET_REGS's copy taken at the exit, which would lose what the instruction under way
still does:
- between runs, or in an IN / OUT exit, at once: the IN / OUT hook is a helper call, after which
  the generated code reloads the guest registers and segment bases from the CPU state, so the
  rest of the instruction and of its translation block see them;
- in an MMIO exit, when the engine stops: generated code may hold the segment bases in host
  registers during a memory access, and Unicorn holds the access's TLB entry, which a control
  register write would flush. The instruction then runs again under the new state, its access
  answered from the exit (mid_instruction_exit.py's replay, as for KVM_SET_REGS there).
Either way the engine then leaves emu_start at the next instruction boundary (Request.RESTART): a
translation block is made for the hflags of its time (CS32, ADDSEG, CPL, ...) and chained to
the next without a lookup, so none made under the old state may run (every emu_start flushes them).
Until then the rest of the current block runs as it was translated. Where the new state is of
another engine mode (real, 32-bit, 64-bit), the vCPU then carries the engine's CPU state into an
engine of that mode, as for a guest that changes mode itself (vcpu.py's _prepare_engine).
"""

from __future__ import annotations

from collections.abc import Callable

from unicorn import Uc

from pcihole.hv.model.cpu import CpuMode
from pcihole.hv.model.cpu_msrs import EngineMsrs
from pcihole.hv.model.engine_state import EngineState
from pcihole.hv.model.special_registers import load_sregs
from pcihole.hv.model.vcpu_state import Request
from pcihole.hv.msr_index import MSR_EFER
from pcihole.hv.uapi import kvm_sregs


class LiveSregs:
    """One vCPU's KVM_SET_SREGS into its running engine (see the module docstring)."""

    def __init__(
        self, requests: set[Request], request_boundary: Callable[[], None], msrs: EngineMsrs
    ) -> None:
        # The vCPU's requests (the same set), how to stop it at the next instruction boundary, and
        # its engine MSRs, through which EFER is written past the MSR intercept (load_sregs).
        self._requests = requests
        self._request_boundary = request_boundary
        self._write_efer = lambda value: msrs.write(MSR_EFER, value, host=True)
        #: Set during an MMIO exit: loaded when the engine stops (KVM_GET_SREGS reads it meanwhile).
        self.pending: kvm_sregs | None = None
        self._mode: CpuMode | None = None  # the mode the last KVM_SET_SREGS put the CPU in

    def set(self, uc: Uc, state: EngineState, sregs: kvm_sregs, mode: CpuMode, in_access: bool) -> None:
        """KVM_SET_SREGS of `sregs` (whose mode is `mode`) into `uc`, whose state is `state`;
        `in_access`: during an MMIO exit (the caller has the instruction run again)."""
        if in_access:
            self.pending = kvm_sregs.from_buffer_copy(sregs)
        else:
            load_sregs(uc, state, sregs, self._write_efer)
        self._mode = mode
        self._requests.add(Request.RESTART)
        self._request_boundary()

    def apply(self, uc: Uc, state: EngineState | None) -> CpuMode | None:
        """The engine stopped, to start again: load what waits. Returns the mode KVM_SET_SREGS put
        the CPU in since the last start, if it did (the caller moves to an engine of that mode)."""
        pending, self.pending = self.pending, None
        if pending is not None and state is not None:
            load_sregs(uc, state, pending, self._write_efer)
        mode, self._mode = self._mode, None
        self._requests.discard(Request.RESTART)
        return mode
