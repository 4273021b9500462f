"""Fixtures for the memory tests (helpers live in memory_guests.py)."""

from __future__ import annotations

import pytest
from memory_guests import TableGuest, open_hv


@pytest.fixture
def table_guest():
    made: list[TableGuest] = []
    hvs = []

    def make(backend: str, strategy: str, **kw) -> TableGuest:
        hv = open_hv(backend)
        hvs.append(hv)
        made.append(TableGuest(hv, strategy, **kw))
        return made[-1]

    yield make
    for g in made:
        g.close()
    for hv in hvs:
        hv.close()
