"""The vCPU run loop: run, drain the coalesced ring, dispatch, complete reads, until a Stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pcihole.hv.exits import CoalescedWrite
from pcihole.hv.interface import Vcpu
from pcihole.machine.dispatch import ExitHandler, Stop, StopReason


def run_until_stop(
    vcpu: Vcpu,
    handler: ExitHandler,
    *,
    timeout: float | None = None,
    on_coalesced: Callable[[list[CoalescedWrite]], None] | None = None,
) -> Stop:
    """Run `vcpu` until the handler says stop, or `timeout` seconds pass (a guest that runs away).

    The coalesced-MMIO ring is drained at every exit, before the exit itself is handled, as QEMU
    does (kvm_cpu_exec -> kvm_flush_coalesced_mmio_buffer): the ring holds writes that happened
    before the exiting access, and a full ring makes writes exit again.
    """
    timer = None
    deadline = None
    if timeout is not None:
        deadline = time.monotonic() + timeout
        timer = threading.Timer(timeout, vcpu.kick)
        timer.daemon = True
        timer.start()
    try:
        while True:
            exit = vcpu.run()
            if on_coalesced is not None:
                writes = vcpu.drain_coalesced_mmio()
                if writes:
                    on_coalesced(writes)
            result = handler.handle(exit)
            if result is None:
                if deadline is not None and time.monotonic() >= deadline:
                    return Stop(StopReason.TIMEOUT, detail=f"the guest was still running after {timeout:g} s")
                continue
            if isinstance(result, Stop):
                return result
            vcpu.complete_read(result)
    finally:
        if timer is not None:
            timer.cancel()
