"""What a hot-plug change costs in kernel objects (counts, never times): with ro-alias a function's
page is remapped inside the hole's slot, so no memslot changes; with writes "trap" or "exit" there is
no coalesced zone either, so a change issues no ioctl at all."""

from __future__ import annotations

import pytest

from pcihole.bench.configs import Config
from pcihole.bench.hotplug import measure_hotplug
from pcihole.bench.scan import Kernel
from pcihole.machine.builder import default_kernel
from pcihole.machine.machinefile import load_default
from tests.backends import BACKENDS


def measure(backend: str, strategy: str, writes: str):
    image, name = default_kernel()
    return measure_hotplug(load_default(), Config(backend, strategy), 3, Kernel(image, name), writes=writes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("writes", ["trap", "exit"])
def test_ro_alias_hotplug_without_zones_issues_no_ioctl(backend, writes):
    r = measure(backend, "ro-alias", writes)
    for change in (r.punch, r.fill):
        assert (change.memslot_creates, change.memslot_deletes, change.other_ops) == (0, 0, {})
    assert r.exits_per_absent_write == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_ro_alias_hotplug_with_discard_changes_zones_but_no_memslot(backend):
    r = measure(backend, "ro-alias", "discard")
    assert (r.punch.memslot_creates, r.punch.memslot_deletes) == (0, 0)
    assert r.punch.other_ops.get("unregister_coalesced_mmio", 0) >= 1
    assert r.exits_per_absent_write == 0  # coalesced


@pytest.mark.parametrize("backend", BACKENDS)
def test_ro_filled_hotplug_still_replaces_slots(backend):
    r = measure(backend, "ro-filled", "exit")
    assert r.punch.memslot_creates >= 2 and r.punch.memslot_deletes >= 1
    assert r.punch.other_ops == {}
