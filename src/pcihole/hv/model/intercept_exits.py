"""`InterceptExits`: what a vCPU does when the engine's SVM intercepts (msr_intercept.py) fire.

Both intercepted instructions reach Python the same way: QEMU's nested-SVM check abandons the
instruction with EIP on it and hands UC_HOOK_INTR an exception number, EXCP_VMEXIT plus the SVM exit
code, which no guest exception can have. The vCPU's interrupt hook asks dispatch() first; what it
takes is finished here as the instruction would have been, so the guest never sees a VMEXIT:
- RDMSR / WRMSR (MSR_EXIT): done through the vCPU's MsrTable (msr.py), RIP moved past the 2-byte
  instruction, or #GP(0) for an MSR nobody owns (kvm_emulate_rdmsr / wrmsr with ignore_msrs=0);
- HLT (HLT_EXIT): stepped over as helper_hlt and do_hlt would, then handed to the vCPU, whose
  halt (KVM_EXIT_HLT, or a sleep until an interrupt) is vcpu.py's: it belongs to the run loop.
"""

from __future__ import annotations

from collections.abc import Callable

from unicorn import Uc
from unicorn.x86_const import UC_X86_REG_EAX, UC_X86_REG_ECX, UC_X86_REG_EDX

from pcihole.hv.model.engine_state import HF_INHIBIT_IRQ_MASK, EngineState
from pcihole.hv.model.instruction_hooks import R_EAX, R_EDX
from pcihole.hv.model.interrupts import GP, Event, EventKind
from pcihole.hv.model.msr import MsrFault, MsrTable
from pcihole.hv.model.msr_intercept import HLT_EXIT, MSR_EXIT

_HLT_BYTES = 1  # helper_hlt's next_eip_addend for the unprefixed F4 compilers and Linux emit
_MSR_INSN_BYTES = 2  # RDMSR 0f 32, WRMSR 0f 30


class InterceptExits:
    """One vCPU's handling of its engines' SVM intercept exits (RDMSR / WRMSR and HLT)."""

    def __init__(
        self,
        msrs: MsrTable,
        write_gprs: Callable[[Uc, dict[int, int], int | None], None],
        deliver: Callable[[Uc, Event], bool],
        halt: Callable[[Uc], None],
    ) -> None:
        self._msrs = msrs
        self._write_gprs = write_gprs  # InstructionHooks.write_gprs: all 64 bits, and RIP
        self._deliver = deliver  # through the guest's IDT (the vCPU's _deliver)
        self._halt = halt  # the vCPU halts, after the HLT was stepped over

    def dispatch(self, uc: Uc, intno: int, state: EngineState | None) -> bool:
        """UC_HOOK_INTR's exception `intno`: True if it was an intercept's exit, now handled.
        `state` is the engine's (the intercept is on only where it is in reach)."""
        if intno == MSR_EXIT:
            self._on_msr(uc, state)
            return True
        if intno == HLT_EXIT:
            self._on_hlt(uc, state)
            return True
        return False

    def _on_hlt(self, uc: Uc, state: EngineState | None) -> None:
        """HLT, intercepted with EIP on it (msr_intercept.py): done here as helper_hlt and do_hlt
        would (EIP after it, the STI shadow dropped: "needed if sti is just before"), then the
        vCPU halts."""
        assert state is not None
        state.load()
        state.set_ip(state.ip + _HLT_BYTES)
        state.hflags = state.hflags & ~HF_INHIBIT_IRQ_MASK
        state.store()
        self._halt(uc)

    def _on_msr(self, uc: Uc, state: EngineState | None) -> None:
        """A guest RDMSR / WRMSR the intercept stopped (msr_intercept.py): EIP is on it and
        error_code says which. Done through self._msrs, or #GP(0) (kvm_emulate_rdmsr / wrmsr with
        ignore_msrs=0: kvm_inject_gp)."""
        assert state is not None
        state.load()
        ip, write = state.ip, state.error_code
        index = uc.reg_read(UC_X86_REG_ECX) & 0xFFFFFFFF
        try:
            if write:  # WRMSR: EDX:EAX
                value = (uc.reg_read(UC_X86_REG_EDX) & 0xFFFFFFFF) << 32 | (
                    uc.reg_read(UC_X86_REG_EAX) & 0xFFFFFFFF
                )
                self._msrs.write(index, value, host=False)
                result = {}
            else:  # RDMSR: EDX:EAX, the upper halves of RAX / RDX cleared in 64-bit mode
                value = self._msrs.read(index, host=False)
                result = {R_EAX: value & 0xFFFFFFFF, R_EDX: value >> 32}
        except MsrFault:
            self._deliver(uc, Event(GP, EventKind.EXCEPTION, 0))
            return
        self._write_gprs(uc, result, ip + _MSR_INSN_BYTES)
