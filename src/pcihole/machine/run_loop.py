"""The vCPU run loop: run, drain the coalesced ring, dispatch, complete reads, until a Stop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

from pcihole.hv.exits import CoalescedWrite, Interrupted, VcpuExit
from pcihole.hv.interface import Vcpu
from pcihole.hv.kvm.c_run_loop import AnsweringVcpu, FillPages
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
    idle_check: Callable[[], Stop | None] | None = None,
    idle_interval: float = 0.25,
    flush_ring_within: float | None = None,
    fill_pages: FillPages | None = None,
) -> Stop:
    """Run `vcpu` until the handler says stop, `timeout` seconds pass (a guest that runs away), or
    someone asks through `stops` (a signal): that Stop is returned at the next exit.

    The coalesced-MMIO ring is drained at every exit, before the exit itself is handled, as QEMU
    does (kvm_cpu_exec -> kvm_flush_coalesced_mmio_buffer): the ring holds writes that happened
    before the exiting access, and a full ring makes writes exit again.

    With `flush_ring_within`, a guest that writes into the ring and then makes no exit (it spins, or
    sleeps in the in-kernel HLT waiting for the interrupt its writes will raise) still has its writes
    delivered within about that many seconds: a thread looks at the ring's indices and kicks the vCPU
    out of KVM_RUN while entries wait (the console's THR writes are coalesced: Machine.run).

    With `fill_pages` (kvm only), the C loop (hv/kvm/run_loop.c) answers the ECAM reads that exit
    (absent functions' with the fill, present functions' from their config mirror pages) between
    KVM_RUNs and hands every other exit to this loop, which is the reference: the
    same guest gives the same answers and the same statistics with and without it. It leaves to
    this loop any exit that finds the coalesced ring holding entries, so the drain-then-handle
    order above is kept, and it returns on a kick (EINTR) as vcpu.run() does.
    """
    run: Callable[[], VcpuExit]
    if fill_pages is None:
        run = vcpu.run
    elif isinstance(vcpu, AnsweringVcpu):
        run = partial(vcpu.run_answering, fill_pages)
    else:
        raise TypeError(f"the C run loop needs a kvm vCPU, not a {type(vcpu).__name__}")
    if stops is None:
        stops = StopRequest()
    timer = None
    # With an in-kernel LAPIC, KVM handles HLT itself and never returns to userspace for it: a guest
    # that halts with interrupts off would sleep in KVM_RUN forever. Every `idle_interval` seconds
    # the vCPU is kicked out of KVM_RUN so that `idle_check` can look at it (Machine.run: halted
    # with IF clear ends the run as HLT did without the irqchip).
    stop_idle = threading.Event()
    kicker = None
    if idle_check is not None or flush_ring_within is not None:
        tick = idle_interval if flush_ring_within is None else min(idle_interval, flush_ring_within)
        idle_every = max(1, round(idle_interval / tick))

        def kick_periodically() -> None:
            ticks = 0
            while not stop_idle.wait(tick):
                ticks += 1
                idle_due = idle_check is not None and ticks % idle_every == 0
                if idle_due or (flush_ring_within is not None and _ring_waiting(vcpu)):
                    vcpu.kick()

        kicker = threading.Thread(target=kick_periodically, name="pcihole-idle-kick", daemon=True)
        kicker.start()
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
            exit = run()
            if on_coalesced is not None:
                writes = vcpu.drain_coalesced_mmio()
                if writes:
                    on_coalesced(writes)
            result = handler.handle(exit)
            if idle_check is not None and isinstance(exit, Interrupted):
                idle = idle_check()
                if idle is not None:
                    return idle
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
        # No kick after this returns: the caller may close the vCPU (StopRequest's lock, and the
        # idle kicker joined).
        stop_idle.set()
        if kicker is not None:
            kicker.join()
        stops.detach()
        if timer is not None:
            timer.cancel()


def _ring_waiting(vcpu: Vcpu) -> bool:
    first, last = vcpu.ring_indices()
    return first != last
