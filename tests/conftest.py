"""Fixtures for every test folder, and the one place tests are skipped for want of /dev/kvm.

Tests come in three tiers (docs/design.md, "Tests"): pure, KVM, and guest runs. A KVM test is marked
`kvm` (tests/backends.py) or asks for a fixture below that opens /dev/kvm; where /dev/kvm cannot be
opened, each is skipped at collection with the reason.
"""

from __future__ import annotations

from contextlib import closing

import pytest
from hypothesis import settings

from pcihole.hv import open_backend
from tests.backends import KVM_UNAVAILABLE

# Hypothesis fails an example that takes over 200 ms by default: a timing assertion, which fails
# on a loaded host (seen: 939 ms on two shared cores). Tests here assert behaviour, never time.
settings.register_profile("pcihole", deadline=None)
settings.load_profile("pcihole")

#: Fixtures that open /dev/kvm: asking for one is the same as carrying the kvm mark.
KVM_FIXTURES = frozenset({"kvm", "kvm_vm", "kvm_hv"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KVM_UNAVAILABLE is None:
        return
    skip = pytest.mark.skip(reason=f"needs /dev/kvm: {KVM_UNAVAILABLE}")
    for item in items:
        if "kvm" in item.keywords or KVM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


@pytest.fixture
def kvm():
    """The kvm backend, opened for one test."""
    with closing(open_backend("kvm")) as hv:
        yield hv


@pytest.fixture
def kvm_vm(kvm):
    with closing(kvm.create_vm()) as vm:
        yield vm


@pytest.fixture(scope="module")
def kvm_hv():
    """The kvm backend, shared by a module's tests."""
    with closing(open_backend("kvm")) as hv:
        yield hv


@pytest.fixture(scope="module")
def model_hv():
    """The model backend, shared by a module's tests."""
    with closing(open_backend("model")) as hv:
        yield hv


@pytest.fixture
def hypervisor(request):
    """The backend named by the test's parameter (parametrize with tests.backends.BACKENDS, indirect=True)."""
    with closing(open_backend(request.param)) as hv:
        yield hv
