"""The slot planner (pure), property-tested: any set of holes is covered exactly, within the limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcihole.memory.address import PAGE_SIZE, GuestRange
from pcihole.memory.slot_planner import (
    ALIAS_MAX,
    ALIAS_MIN,
    MAX_SLOT_BYTES,
    PlanError,
    default_map_budget,
    merge_runs,
    plan_alias,
    plan_plain_slots,
)

MiB = 1 << 20
GiB = 1 << 30


@st.composite
def hole_runs(draw):
    """Disjoint page-aligned runs (gaps between them may be 0, so adjacent runs occur) with fills."""
    n = draw(st.integers(0, 12))
    pos = draw(st.integers(0, 1 << 20)) * PAGE_SIZE
    runs = []
    for _ in range(n):
        pos += draw(st.sampled_from([0, 1, 7, 1 << 8])) * PAGE_SIZE
        pages = draw(st.one_of(st.integers(1, 64), st.integers(1, 1 << 18), st.integers(1, 1 << 23)))
        fill = draw(st.sampled_from([0xFF, 0xFF, 0x00, 0xA5]))
        runs.append((GuestRange.from_size(pos, pages * PAGE_SIZE), fill))
        pos += pages * PAGE_SIZE
    return runs


def _bytes_by_fill(runs):
    out: dict[int, list[tuple[int, int]]] = {}
    for rng, fill in merge_runs(runs):
        out.setdefault(fill, []).append((rng.start.value, rng.end))
    return out


@settings(max_examples=300, deadline=None)
@given(hole_runs(), st.integers(1, 40000), st.integers(1, 20000))
def test_alias_plan_covers_every_hole_byte_once_within_the_limits(runs, free_slots, budget):
    try:
        plan = plan_alias(runs, free_slots=free_slots, map_budget=budget)
    except PlanError as e:
        # Refusing is only allowed when a limit really is exceeded, and must say which.
        assert "memslots" in str(e) or "mappings" in str(e)
        fills = {f for _, f in runs}
        assert (
            len(fills) > budget
            or len(merge_runs(runs)) > free_slots
            or _needed_slots(runs, budget) > free_slots
        )
        return
    assert plan.mappings <= budget
    assert len(plan.slots) <= free_slots
    for spec in plan.aliases:
        assert ALIAS_MIN <= spec.alias_size <= ALIAS_MAX and spec.alias_size % ALIAS_MIN == 0
        assert spec.arena_size % spec.alias_size == 0 and spec.arena_size <= MAX_SLOT_BYTES
    # Exact cover: per fill, the slots tile exactly the merged runs; every slot fits its arena.
    slots_by_fill: dict[int, list[tuple[int, int]]] = {}
    for s in plan.slots:
        assert s.range.is_page_aligned()
        assert s.range.size <= plan.alias_for(s.fill).arena_size
        slots_by_fill.setdefault(s.fill, []).append((s.range.start.value, s.range.end))
    expected = _bytes_by_fill(runs)
    assert set(slots_by_fill) == set(expected)
    for fill, spans in slots_by_fill.items():
        spans.sort()
        merged: list[list[int]] = []
        for a, b in spans:
            assert not merged or a >= merged[-1][1], "slots overlap"
            if merged and merged[-1][1] == a:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        assert [tuple(m) for m in merged] == expected[fill]
    # One slot per run whenever the run fits in its arena.
    for rng, fill in merge_runs(runs):
        inside = [s for s in plan.slots if rng.covers(s.range)]
        arena = plan.alias_for(fill).arena_size
        assert len(inside) == -(-rng.size // arena)


def _needed_slots(runs, budget):
    merged = merge_runs(runs)
    fills = {f for _, f in merged}
    per_fill = budget // max(len(fills), 1)
    cap = per_fill * ALIAS_MAX
    return sum(-(-r.size // min(cap, r.size)) for r, _ in merged)


def test_a_256_bus_ecam_is_one_slot_of_4096_mappings_of_64k():
    ecam = GuestRange.from_size(0xE0000000, 256 * MiB)
    plan = plan_alias([(ecam, 0xFF)], free_slots=32764, map_budget=16384)
    assert [s.range for s in plan.slots] == [ecam]
    (alias,) = plan.aliases
    assert (alias.alias_size, alias.arena_size, alias.mappings) == (64 * 1024, 256 * MiB, 4096)


def test_the_alias_grows_when_the_map_budget_is_tight():
    ecam = GuestRange.from_size(0xE0000000, 256 * MiB)
    plan = plan_alias([(ecam, 0xFF)], free_slots=10, map_budget=1000)
    (alias,) = plan.aliases
    assert alias.alias_size == 512 * 1024 and alias.mappings == 512 and len(plan.slots) == 1
    # A budget too small even for 2 MiB aliases splits the run into several slots over one arena.
    plan = plan_alias([(ecam, 0xFF)], free_slots=10, map_budget=16)
    (alias,) = plan.aliases
    assert alias.alias_size == ALIAS_MAX and alias.arena_size == 32 * MiB and len(plan.slots) == 8


def test_many_ecam_segments_share_one_arena():
    segs = [(GuestRange.from_size(0x40_0000_0000 + i * GiB, 256 * MiB), 0xFF) for i in range(16)]
    plan = plan_alias(segs, free_slots=100, map_budget=16384)
    assert len(plan.slots) == 16 and plan.mappings == 4096


def test_refusals_name_the_limit():
    runs = [(GuestRange.from_size(i * 2 * PAGE_SIZE, PAGE_SIZE), 0xFF) for i in range(5)]
    with pytest.raises(PlanError, match="need 5 memslots but only 4 are free"):
        plan_alias(runs, free_slots=4, map_budget=100)
    with pytest.raises(PlanError, match="need 5 memslots but only 4 are free"):
        plan_plain_slots(runs, free_slots=4)
    with pytest.raises(PlanError, match="mappings"):
        plan_alias([(runs[0][0], 0), (runs[1][0], 1)], free_slots=4, map_budget=1)


def test_default_map_budget_stays_well_under_max_map_count():
    assert default_map_budget(65530, 200) == 16332
    assert default_map_budget(65530, 65000) == 132
    assert default_map_budget(1_000_000, 0) == 16384
    assert default_map_budget(100, 200) == 0
