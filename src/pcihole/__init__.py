"""pcihole: a small VMM on Linux KVM built around the guest physical memory map."""

__version__ = "0.1.0"
