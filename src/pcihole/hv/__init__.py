"""Hypervisor backends behind one interface (hv/interface.py).

`open_backend("kvm")` opens the real /dev/kvm; `open_backend("model")` the reference model of KVM's
memslot subsystem with the seed's KVM_MEM_PCI_HOLE and the MMIO fill device (hv/model/).

The kvm backend opens /dev/kvm, or the path in the environment variable PCIHOLE_KVM_DEVICE when it
is set (a seam for tests and unusual hosts: point it at a path that does not exist, or at a file
without permission, to see what pcihole says when /dev/kvm is missing or not permitted).
"""

from __future__ import annotations

import os

from pcihole.hv.interface import Hypervisor

#: Environment variable naming the KVM device the kvm backend opens (default /dev/kvm).
KVM_DEVICE_ENV = "PCIHOLE_KVM_DEVICE"


class BackendUnavailable(RuntimeError):
    """The backend cannot be opened here; the message says why."""


def open_backend(name: str) -> Hypervisor:
    if name == "kvm":
        from pcihole.hv.kvm.system import Kvm

        path = kvm_device()
        try:
            return Kvm(path)
        except FileNotFoundError:
            raise BackendUnavailable(
                f"kvm backend: {path} does not exist (is the kvm module loaded?)"
            ) from None
        except PermissionError:
            raise BackendUnavailable(
                f"kvm backend: no permission to open {path} (add yourself to group 'kvm')"
            ) from None
        except OSError as e:  # e.g. ENOTTY: the path is not a KVM device
            raise BackendUnavailable(f"kvm backend: {path} is not a usable KVM device: {e}") from None
    if name == "model":
        from pcihole.hv.model.system import ModelKvm

        return ModelKvm()
    raise ValueError(f"unknown backend {name!r}: expected 'kvm' or 'model'")


def kvm_device() -> str:
    """The path the kvm backend opens: $PCIHOLE_KVM_DEVICE if set, else /dev/kvm."""
    from pcihole.hv.kvm.system import KVM_DEVICE

    return os.environ.get(KVM_DEVICE_ENV) or KVM_DEVICE


def kvm_available() -> str | None:
    """None where /dev/kvm opens; otherwise the reason it does not."""
    try:
        open_backend("kvm").close()
    except (BackendUnavailable, OSError) as e:
        return str(e)
    return None
