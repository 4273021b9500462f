"""Shared fixtures. Tests come in three tiers (STYLE.md): pure, KVM, and guest runs.

KVM tests skip only where /dev/kvm cannot be opened, and say why.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/guestasm.py and friends

from pcihole.hv import kvm_available  # noqa: E402

KVM_UNAVAILABLE = kvm_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KVM_UNAVAILABLE is None:
        return
    skip = pytest.mark.skip(reason=f"needs /dev/kvm: {KVM_UNAVAILABLE}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kvm():
    from pcihole.hv import open_backend

    if KVM_UNAVAILABLE is not None:
        pytest.skip(f"needs /dev/kvm: {KVM_UNAVAILABLE}")
    hv = open_backend("kvm")
    yield hv
    hv.close()


@pytest.fixture
def kvm_vm(kvm):
    vm = kvm.create_vm()
    yield vm
    vm.close()
