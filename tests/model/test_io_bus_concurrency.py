"""The model's kvm_io_bus read by a vCPU thread while another thread registers and unregisters devices.

The kernel never changes a bus in place: kvm_io_bus_register_dev / kvm_io_bus_unregister_dev build a
new struct kvm_io_bus, publish it with rcu_assign_pointer and wait for readers (synchronize_srcu), so
an access sees the bus before or after a change, whole. The soak's hot-plug on the mmio-bus strategy
once died of an IndexError in the model's bsearch, which read a list the other thread had shortened.
"""

from __future__ import annotations

import sys
import threading

from pcihole.hv.model.io_bus import IoBus

FILL = b"\xff" * 4
BASE = 0xE0000000
PAGE = 0x1000
CHURN_DEVICES = 64
CHANGES = 20000


class Fill:
    def write(self, addr: int, data: bytes) -> bool:
        return True

    def read(self, addr: int, length: int) -> bytes | None:
        return FILL[:length]


def test_reads_see_a_whole_bus_while_another_thread_changes_it():
    bus = IoBus("KVM_MMIO_BUS")
    steady = Fill()
    bus.register(BASE, PAGE, steady, "KVM_REGISTER", "steady")  # always there: every read must hit it
    churn = [Fill() for _ in range(CHURN_DEVICES)]
    errors: list[BaseException] = []
    done = threading.Event()

    def change() -> None:
        try:
            for i in range(CHANGES):
                dev = churn[i % CHURN_DEVICES]
                if i // CHURN_DEVICES % 2 == 0:
                    # Around the steady page on both sides, so that the bsearch's indexes move.
                    side = -1 if i % 2 else 1
                    bus.register(BASE + side * (i % CHURN_DEVICES + 1) * PAGE, PAGE, dev, "KVM_REGISTER", "x")
                else:
                    bus.unregister(dev)
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            done.set()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows: widens any window
    thread = threading.Thread(target=change, name="io-bus-changes")
    misses = reads = 0
    try:
        thread.start()
        while not done.is_set():
            for offset in (0, 0x7FC, PAGE - 4):
                try:
                    if bus.read(BASE + offset, 4) != FILL or not bus.write(BASE + offset, FILL):
                        misses += 1
                except IndexError as e:
                    errors.append(e)
                reads += 1
    finally:
        thread.join()
        sys.setswitchinterval(old_interval)
    assert not errors, errors[:3]
    assert misses == 0, f"{misses} of {reads} accesses missed the device that was always on the bus"
    assert reads > 0
