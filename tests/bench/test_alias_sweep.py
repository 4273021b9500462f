"""The ro-alias granule x prefault sweep boots the default machine once per point and counts what each
choice costs (counts only: backing, mappings, memslots, host page faults, exits; never times)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pcihole.bench.alias_sweep import measure_alias_sweep
from pcihole.bench.plan import QUICK
from pcihole.bench.scan import Kernel
from pcihole.host.tsc import tsc_clock
from pcihole.machine.builder import default_kernel
from pcihole.machine.machinefile import load_default
from pcihole.memory.slot_planner import MAP_BUDGET_CAP
from tests.backends import BACKENDS

KiB = 1 << 10
PLAN = replace(QUICK, alias_granules=(4 * KiB, 64 * KiB), alias_sweep_runs=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sweep_counts_backing_mappings_slots_and_first_touch_faults(backend):
    rows = measure_alias_sweep(load_default(), backend, PLAN, Kernel(*default_kernel()), tsc_clock())
    by_point = {(r.granule, r.prefault): r.row for r in rows}
    assert by_point.keys() == {(g, p) for g in (None, 4 * KiB, 64 * KiB) for p in (False, True)}
    for (granule, prefault), row in by_point.items():
        assert row.absent_exits == 0 and row.ecam_exits == 0, (granule, prefault)
        if granule is not None:
            assert row.hole_backing_bytes == granule
            assert row.hole_mappings is not None and row.hole_mappings <= MAP_BUDGET_CAP
    # 64 KiB: one slot over the 256 MiB window (plus RAM), 4,096 mappings.
    assert by_point[(64 * KiB, True)].hole_mappings == (256 << 20) // (64 * KiB)
    assert by_point[(64 * KiB, True)].memslots == 2
    # 4 KiB would need 65,536 mappings: the arena stops at the budget and the window takes more slots.
    assert by_point[(4 * KiB, True)].memslots > by_point[(64 * KiB, True)].memslots
    # Prefault removes the host page faults of the guest's first touch of each hole page (one per
    # fault-around window, 64 KiB by default, without it): an order of magnitude fewer in the run.
    for granule in (None, 4 * KiB, 64 * KiB):
        off, on = by_point[(granule, False)].host_faults, by_point[(granule, True)].host_faults
        assert off is not None and on is not None
        assert on * 10 < off, (granule, on, off)
