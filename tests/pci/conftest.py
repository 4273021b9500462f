"""Fixtures for the PCI tests."""

import pytest

from pcihole.pci.host_bridge import HostBridge
from tests.pci.pci_test_machines import small_topology


@pytest.fixture
def bridge() -> HostBridge:
    return HostBridge(small_topology())


@pytest.fixture
def trapping_bridge() -> HostBridge:
    return HostBridge(small_topology(writes="trap"))
