"""`MidInstructionExit`: an exit from the middle of an instruction, and what KVM_SET_REGS does during it.

The model's MMIO and port-I/O exits pause the engine inside the instruction (in an IN / OUT hook or
an MMIO access, RIP still on it), where KVM has either finished the instruction already (an MMIO
write) or will finish it on the next KVM_RUN (a read, port I/O). A VMM that sets the registers in
between must see what KVM does with them, which depends on the exit:
- port I/O (kvm_fast_pio): complete_fast_pio_in / complete_fast_pio_out finish the instruction and
  skip it only if RIP is still where it was at the exit (kvm_is_linear_rip(vcpu,
  vcpu->arch.pio.linear_rip)); a RIP moved elsewhere is taken, the instruction left undone (an IN's
  data dropped, RAX as the VMM set it: `rip_moved`; the engine leaves the translation block after
  the hook, engine/patches/0005);
- an MMIO read: complete_emulated_mmio -> complete_emulated_io re-enters the emulator with
  EMULTYPE_NO_DECODE, whose writeback sets RIP past the instruction it decoded (ctxt->_eip): a RIP
  set meanwhile is overwritten;
- an MMIO write: the emulator finished the instruction before the exit (writeback), so KVM_GET_REGS
  reads RIP past it (`kvm_view`; a REP string store's stays on it, its RCX / RSI / RDI stepped) and a RIP
  moved from there is taken (here, where the engine is still on the instruction, one left as read
  finishes it).
And registers set during an MMIO exit cannot simply be written into the paused engine: its
generated code may hold guest registers in host ones and overwrite them. The vCPU (vcpu.py's
exit_to_user) then stops the engine at the start of the instruction and runs it again with the
VMM's registers, answering its access from the exit that was already made (`replay`).

KVM keeps only the last KVM_SET_REGS of an exit (__set_regs overwrites vcpu->arch.regs) and looks
at RIP at the next KVM_RUN; KVM_GET_REGS meanwhile reads back what was set. So the VMM's RIP waits
here until the exit ends, and only the last one goes into the engine, where it moves the guest.

This is that bookkeeping, one per vCPU; the run loop says when an exit starts and ends.
"""

from __future__ import annotations

from collections.abc import Callable

from unicorn import Uc

from pcihole.hv import exits
from pcihole.hv.model import cpu
from pcihole.hv.model.engine_state import EngineState
from pcihole.hv.model.instruction_length import WriteExit, pio_end, step_string
from pcihole.hv.uapi import kvm_regs

_MID_INSTRUCTION = exits.MmioRead | exits.MmioWrite | exits.IoIn | exits.IoOut
_MEMORY_ACCESS = exits.MmioRead | exits.MmioWrite


class MidInstructionExit:
    """The exit a vCPU is paused in, RIP then, and what KVM_SET_REGS did during it."""

    def __init__(self) -> None:
        # The exit paused in the middle of an instruction, and RIP then (None: no such exit).
        self._kind: type[exits.VcpuExit] | None = None
        self._rip: int | None = None
        #: KVM_SET_REGS moved RIP during the last exit (an IN's data is then dropped).
        self.rip_moved = False
        self._regs_set = False  # KVM_SET_REGS during that exit (an MMIO one is replayed)
        # The registers the engine got from the last KVM_SET_REGS during that exit (RIP as set).
        self._engine_regs: kvm_regs | None = None
        # An MMIO exit whose instruction runs again with the VMM's registers, and its answer:
        # the exit the instruction makes again, and what to return without the VMM.
        self._replay: tuple[exits.VcpuExit, bytes | None] | None = None
        # An MMIO write exit as KVM reports it (RIP past the instruction), computed when first
        # asked: what computes it, and the answer.
        self._compute_write_exit: Callable[[int], WriteExit | None] | None = None
        self._write: WriteExit | None = None

    @property
    def _vmm_rip(self) -> int | None:
        """RIP as the last KVM_SET_REGS during this exit set it (None: no KVM_SET_REGS)."""
        return None if self._engine_regs is None else self._engine_regs.rip

    def _rip_taken(self) -> bool:
        """Whether the last RIP KVM_SET_REGS set during this exit moves the guest (module
        docstring): KVM keeps only the last write (__set_regs) and decides at the next KVM_RUN."""
        if self._vmm_rip is None:
            return False
        if self._kind is exits.MmioRead:
            return False
        return self._vmm_rip != self._kvm_rip()

    def _write_exit(self) -> WriteExit | None:
        """This MMIO write exit as KVM reports it (None: another exit, or code that cannot be read)."""
        compute = self._compute_write_exit
        if self._kind is not exits.MmioWrite or compute is None or self._rip is None:
            return None
        if self._write is None:
            self._write = compute(self._rip)
        return self._write

    def _kvm_rip(self) -> int | None:
        """RIP at this exit as KVM has it: past the instruction for an MMIO write."""
        write = self._write_exit()
        return self._rip if write is None else write.rip

    def kvm_view(self, regs: kvm_regs) -> None:
        """KVM_GET_REGS: the engine's `regs` as KVM has them during this exit: RIP as the VMM last
        set it (the engine's waits for the exit's end), and in an MMIO write exit whose RIP the VMM
        did not move, RIP past the instruction, a string store's registers stepped."""
        if self._rip is None or regs.rip != self._rip:
            return
        write = None if self._rip_taken() else self._write_exit()
        if write is not None:
            regs.rip = write.rip
            if write.string is not None:
                step_string(regs, write.string, 1)
        if self._vmm_rip is not None:
            regs.rip = self._vmm_rip

    def registers_set(self, regs: kvm_regs, in_exit: bool) -> tuple[kvm_regs, bool]:
        """KVM_SET_REGS's `regs` (`in_exit`: the vCPU is paused in an exit): the registers for the
        engine, and whether RIP goes into it now. In the middle of an instruction it waits for the
        exit's end (`end`), where only the last RIP set counts, as on KVM; the engine then gets
        the string store's registers before its step (kvm_view) where the instruction finishes.
        Elsewhere (a boundary's Interrupted, an exit after emu_start returned) RIP is taken now."""
        if not in_exit or self._rip is None:
            return regs, True
        self._engine_regs, self._regs_set = regs, True
        write = None if self._rip_taken() else self._write_exit()
        if write is not None and write.string is not None:
            regs = kvm_regs.from_buffer_copy(regs)
            step_string(regs, write.string, -1)  # RIP stays as set
            self._engine_regs = regs
        return regs, False

    def state_set(self) -> bool:
        """KVM_SET_SREGS during this exit: True in an MMIO one, whose instruction then runs again
        under the new state (live_sregs.py), as after KVM_SET_REGS."""
        if self._kind in (exits.MmioRead, exits.MmioWrite):
            self._regs_set = True
            return True
        return False

    def begin(
        self,
        exit_: exits.VcpuExit,
        rip: Callable[[], int],
        write_exit: Callable[[int], WriteExit | None],
    ) -> None:
        """The vCPU pauses in `exit_`; `rip` reads RIP (asked only for an exit mid-instruction),
        `write_exit` says how KVM reports the MMIO write exit of the instruction at a RIP (asked
        only if the VMM reads or sets the registers during one)."""
        if isinstance(exit_, _MID_INSTRUCTION):
            self._kind, self._rip = type(exit_), rip()
            self.rip_moved = self._regs_set = False
            self._engine_regs = None
            self._compute_write_exit, self._write = write_exit, None

    def end(self, exit_: exits.VcpuExit) -> tuple[bool, kvm_regs | None]:
        """The vCPU resumes from `exit_`: (True if KVM_SET_REGS during this MMIO exit left RIP where
        the instruction runs again: the caller replays it, replay_later; the registers to write
        into the engine, RIP included, where the last KVM_SET_REGS moved RIP, else None)."""
        self.rip_moved = self._rip_taken()
        moved = self._engine_regs if self.rip_moved else None
        replay = self._regs_set and isinstance(exit_, _MEMORY_ACCESS) and not self.rip_moved
        self._kind = self._rip = self._compute_write_exit = None
        self._regs_set = False
        self._engine_regs = None
        return replay, moved

    def replay_later(self, exit_: exits.VcpuExit, value: bytes | None) -> None:
        """The instruction of `exit_` runs again: its access is answered with `value`."""
        self._replay = (exit_, value)

    @property
    def replay_pending(self) -> bool:
        return self._replay is not None

    def take_replay(self, exit_: exits.VcpuExit) -> tuple[bool, bytes | None]:
        """At an exit: (True, the answer) if it is the replayed instruction's; the replay is spent
        either way."""
        replay, self._replay = self._replay, None
        if replay is not None and replay[0] == exit_:
            return True, replay[1]
        return False, None


def finish_pio(
    uc: Uc, mode: cpu.CpuMode, state: EngineState | None, code: bytes, bits: int, size: int, value: int | None
) -> None:
    """Finish the IN or OUT an exit paused in (`code`: its bytes; `value`: an IN's data, into RAX
    as the instruction puts it) and move RIP past it, so that the engine leaves its translation
    block there (engine/patches/0005) and the next block start, a boundary, delivers what the VMM
    queued during the exit, as KVM injects it at the next entry, right after the instruction
    (complete_fast_pio_in / complete_fast_pio_out, then kvm_check_and_inject_events). INS / OUTS
    are left to the engine (what was queued then waits for the next block)."""
    regs = cpu.read_regs(uc, mode, state)
    end = pio_end(code, regs.rip, bits)
    if end is None:
        return
    regs.rip = end
    if value is not None:
        mask = (1 << (8 * size)) - 1
        regs.rax = value if size == 4 else regs.rax & ~mask | value  # a 32-bit IN zero-extends
    cpu.write_regs(uc, mode, regs, state)
