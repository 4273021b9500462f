"""The backends and strategies the tests run on, and the one check of whether /dev/kvm can be opened.

A test that needs /dev/kvm says so with the `kvm` mark (`needs_kvm` below, or a parameter from
BACKENDS / BACKEND_STRATEGIES, which carry it), or by asking for one of tests/conftest.py's kvm
fixtures. That is the one skip mechanism: tests/conftest.py skips every such test, with
KVM_UNAVAILABLE as the reason, where /dev/kvm cannot be opened. Nothing else skips for /dev/kvm.
"""

from __future__ import annotations

import pytest

from pcihole.hv import kvm_available, open_backend

#: Why /dev/kvm cannot be opened here, or None when it can (checked once per test session).
KVM_UNAVAILABLE: str | None = kvm_available()

needs_kvm = pytest.mark.kvm

#: What each backend can express (docs/design.md, "Strategies"): the model adds the seed's
#: KVM_MEM_PCI_HOLE (`native`) and the in-kernel MMIO-bus fill device (`mmio-bus`).
STRATEGIES_BY_BACKEND = {
    "kvm": ("exit", "ro-filled", "ro-alias"),
    "model": ("exit", "ro-filled", "ro-alias", "native", "mmio-bus"),
}

#: Parametrize a test over both backends (`backend` or, with indirect=True, the `hypervisor` fixture).
BACKENDS = [pytest.param("model", id="model"), pytest.param("kvm", id="kvm", marks=needs_kvm)]

#: A test run on both backends through tests/conftest.py's `hypervisor` fixture.
on_both_backends = pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)

#: Parametrize `("backend", "strategy")` over every strategy of every backend.
BACKEND_STRATEGIES = [
    pytest.param(b, s, id=f"{b}-{s}", marks=[needs_kvm] if b == "kvm" else [])
    for b, strategies in STRATEGIES_BY_BACKEND.items()
    for s in strategies
]

#: The same pairs, plain, for a test that loops over them itself.
ALL_COMBINATIONS = [(b, s) for b, strategies in STRATEGIES_BY_BACKEND.items() for s in strategies]

#: The pairs this host can run: kvm ones only where /dev/kvm opens.
AVAILABLE_COMBINATIONS = [c for c in ALL_COMBINATIONS if c[0] == "model" or KVM_UNAVAILABLE is None]


def open_hv(name: str):
    """open_backend(name) for a test that carries the kvm mark when `name` is "kvm"."""
    return open_backend(name)
