"""TscClock: the guest TSC as a fixed frequency over a host clock (tests drive the host clock)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pcihole.hv.model.tsc import TSC_MASK, TscClock


class FakeHostClock:
    """A host monotonic clock the test moves by hand (the clock is an input, not a mock of Linux)."""

    def __init__(self, start: int = 5_000_000_000) -> None:
        self.ns = start

    def __call__(self) -> int:
        return self.ns


def test_counts_khz_ticks_per_millisecond_from_zero():
    host = FakeHostClock()
    tsc = TscClock(2_500_000, now_ns=host)  # 2.5 GHz
    assert tsc.read() == 0
    host.ns += 1_000_000  # 1 ms
    assert tsc.read() == 2_500_000
    host.ns += 400
    assert tsc.read() == 2_501_000


def test_write_sets_the_value_and_it_counts_on():
    host = FakeHostClock()
    tsc = TscClock(1_000_000, now_ns=host)
    host.ns += 777
    tsc.write(10**12)
    assert tsc.read() == 10**12
    host.ns += 1000
    assert tsc.read() == 10**12 + 1000
    assert tsc.adjust == 0  # a host (KVM_SET_MSRS) write does not touch IA32_TSC_ADJUST


def test_guest_write_moves_tsc_adjust_by_the_same_step():
    host = FakeHostClock()
    tsc = TscClock(1_000_000, now_ns=host)
    host.ns += 500
    tsc.guest_write(100)
    assert tsc.read() == 100
    assert tsc.adjust == (100 - 500) & TSC_MASK


def test_write_adjust_moves_the_counter_by_the_difference():
    host = FakeHostClock()
    tsc = TscClock(1_000_000, now_ns=host)
    host.ns += 1000
    tsc.write_adjust(50)
    assert tsc.read() == 1050 and tsc.adjust == 50
    tsc.write_adjust(20)
    assert tsc.read() == 1020 and tsc.adjust == 20


@given(
    khz=st.integers(1, 10_000_000),
    offset=st.integers(0, 1 << 50),
    ahead=st.integers(0, 1 << 40),
    elapsed=st.integers(0, 1 << 40),
)
def test_deadline_is_reached_at_its_host_time_never_before(khz, offset, ahead, elapsed):
    host = FakeHostClock()
    tsc = TscClock(khz, now_ns=host)
    host.ns += elapsed
    tsc.write(offset)
    deadline = tsc.read() + ahead
    at = tsc.host_ns_at(deadline)
    assert tsc.read(max(at, host.ns)) >= deadline
    if at > host.ns:  # in the future: one ns earlier is too early
        assert tsc.read(at - 1) < deadline
    assert tsc.ns_until(deadline) == max(0, at - host.ns)


def test_a_deadline_in_the_past_is_due_now():
    host = FakeHostClock()
    tsc = TscClock(1_000_000, now_ns=host)
    host.ns += 10_000
    assert tsc.ns_until(5_000) == 0
