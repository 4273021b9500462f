"""The exit-path breakdown takes the real path: one exit per read of the loop guest, every step
measured (counts and presence, never times)."""

from __future__ import annotations

import pytest

from pcihole.bench.exit_path import STEPS, measure_breakdown
from tests.backends import BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_read_of_the_loop_guest_is_one_exit_through_every_step(backend):
    b = measure_breakdown(backend, reads=300, runs=1)
    assert b.exits == 300
    assert set(b.steps) == set(STEPS)
    assert b.steps["ioctl"] > 0 and b.steps["device"] > 0 and b.bare_seconds_per_exit > 0
    assert b.ratio is not None
    # the untimed pass through the machine's run loop took the same reads (it checks their count)
    assert b.run_loop_seconds_per_exit > 0 and b.run_loop_ratio is not None
    assert b.as_dict()["total"] == b.total
    if backend == "kvm":
        # the bare C loop answered every read itself, and the run loop with the C loop counted
        # them all (both check their counts, and raise otherwise)
        assert b.c_skipped == "" and b.c_bare_seconds_per_exit and b.c_run_loop_seconds_per_exit
        assert b.c_run_loop_ratio is not None and b.c_run_loop_over_python_bare is not None
    else:
        assert b.c_bare_seconds_per_exit is None and "model backend has none" in b.c_skipped
