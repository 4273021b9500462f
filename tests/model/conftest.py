"""Fixtures for the model's tests: the two backends, and small guests run the same way on both."""

from __future__ import annotations

import pytest

from pcihole.hv import kvm_available, open_backend

KVM_UNAVAILABLE = kvm_available()

kvm_only = [
    pytest.mark.kvm,
    pytest.mark.skipif(KVM_UNAVAILABLE is not None, reason=f"/dev/kvm cannot be opened: {KVM_UNAVAILABLE}"),
]

# Parametrize a test over both backends; the kvm one is marked and skipped where /dev/kvm is missing.
BACKENDS = [pytest.param("model", id="model"), pytest.param("kvm", id="kvm", marks=kvm_only)]


@pytest.fixture
def hypervisor(request):
    hv = open_backend(request.param)
    yield hv
    hv.close()


@pytest.fixture(scope="module")
def kvm_hv():
    if KVM_UNAVAILABLE is not None:
        pytest.skip(f"/dev/kvm cannot be opened: {KVM_UNAVAILABLE}")
    hv = open_backend("kvm")
    yield hv
    hv.close()


@pytest.fixture(scope="module")
def model_hv():
    hv = open_backend("model")
    yield hv
    hv.close()
