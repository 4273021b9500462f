"""Where a model vCPU is (`VcpuState`) and what other threads ask of it (`Request`).

Both are read by more than the run loop in vcpu.py: the long-mode switch (long_mode_switch.py)
asks for a new engine with a Request, as set_sregs does (live_sregs.py), so they live below both.
"""

from __future__ import annotations

from enum import Enum


class VcpuState(Enum):
    IDLE = "outside the engine"  # between runs: no guest code runs
    RUNNING = "emulating"  # inside emu_start; a memslot change waits for its next boundary
    IN_EXIT = "paused in an exit"  # inside emu_start, in a callback; run() returned the exit
    CLOSING = "leaving the engine for good"  # close(): no more exits, no more mapping
    CLOSED = "closed"


class Request(Enum):
    """What other threads (or set_sregs) ask of the vCPU, as KVM's kvm_make_request."""

    KICK = "kick"  # the running (or next) run() returns Interrupted
    NEW_ENGINE = "new engine"  # build the first engine, from _regs and _sregs
    # KVM_SET_SREGS loaded the running engine: leave emu_start at the next boundary, so that no
    # translation made under the old state runs (live_sregs.py).
    RESTART = "restart"
    # The guest changed the CPU mode itself (a 32-bit engine followed it into long mode): carry
    # the engine's whole CPU state into an engine of the new mode (cpu.carry_state).
    MODE_CHANGE = "mode change"


#: The requests that stop the engine at the next boundary, to start it again (or another).
RESTARTS = frozenset((Request.NEW_ENGINE, Request.RESTART, Request.MODE_CHANGE))
