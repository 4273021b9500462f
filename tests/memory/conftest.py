"""Fixtures for the memory tests: `table_guest` makes TableGuests (tests/guest_runner.py) and closes them."""

from __future__ import annotations

import pytest

from pcihole.hv import open_backend
from tests.guest_runner import TableGuest


@pytest.fixture
def table_guest():
    made: list[TableGuest] = []
    hvs = []

    def make(backend: str, strategy: str, **kw) -> TableGuest:
        hv = open_backend(backend)
        hvs.append(hv)
        made.append(TableGuest(hv, strategy, **kw))
        return made[-1]

    yield make
    for g in made:
        g.close()
    for hv in hvs:
        hv.close()
