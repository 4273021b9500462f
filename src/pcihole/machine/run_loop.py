"""The vCPU run loop: run, drain the coalesced ring, dispatch, complete reads, until a Stop."""

from __future__ import annotations

import threading
from collections.abc import Callable

from pcihole.hv.exits import CoalescedWrite
from pcihole.hv.interface import Vcpu
from pcihole.machine.dispatch import ExitHandler, Stop, StopReason
from pcihole.machine.stop_request import StopRequest


def run_until_stop(
    vcpu: Vcpu,
    handler: ExitHandler,
    *,
    timeout: float | None = None,
    on_coalesced: Callable[[list[CoalescedWrite]], None] | None = None,
    stops: StopRequest | None = None,
    stop_requested: Callable[[], Stop | None] | None = None,
) -> Stop:
    """Run `vcpu` until the handler says stop, `timeout` seconds pass (a guest that runs away), or
    someone asks through `stops` (a signal): that Stop is returned at the next exit.

    The coalesced-MMIO ring is drained at every exit, before the exit itself is handled, as QEMU
    does (kvm_cpu_exec -> kvm_flush_coalesced_mmio_buffer): the ring holds writes that happened
    before the exiting access, and a full ring makes writes exit again.
    """
    if stops is None:
        stops = StopRequest()
    timer = None
    if timeout is not None:
        timer = threading.Timer(
            timeout,
            stops.request,
            [Stop(StopReason.TIMEOUT, detail=f"the guest was still running after {timeout:g} s")],
        )
        timer.daemon = True
    stops.attach(vcpu)
    try:
        if timer is not None:
            timer.start()
        while stops.stop is None:
            exit = vcpu.run()
            if on_coalesced is not None:
                writes = vcpu.drain_coalesced_mmio()
                if writes:
                    on_coalesced(writes)
            result = handler.handle(exit)
            if stop_requested is not None and not isinstance(result, Stop):
                requested = stop_requested()
                if requested is not None:
                    if isinstance(result, bytes):
                        vcpu.complete_read(result)
                    return requested
            if result is None:
                continue
            if isinstance(result, Stop):
                return result
            vcpu.complete_read(result)
        return stops.stop
    finally:
        # No kick after this returns: the caller may close the vCPU (StopRequest's lock).
        stops.detach()
        if timer is not None:
            timer.cancel()
