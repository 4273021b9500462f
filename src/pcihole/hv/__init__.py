"""Hypervisor backends behind one interface (hv/interface.py).

`open_backend("kvm")` opens the real /dev/kvm; `open_backend("model")` the reference model of KVM's
memslot subsystem with the seed's KVM_MEM_PCI_HOLE and the MMIO fill device (hv/model/).
"""

from __future__ import annotations

from pcihole.hv.interface import Hypervisor


class BackendUnavailable(RuntimeError):
    """The backend cannot be opened here; the message says why."""


def open_backend(name: str) -> Hypervisor:
    if name == "kvm":
        from pcihole.hv.kvm.system import KVM_DEVICE, Kvm

        try:
            return Kvm()
        except FileNotFoundError:
            raise BackendUnavailable(f"kvm backend: {KVM_DEVICE} does not exist (is the kvm module loaded?)") from None
        except PermissionError:
            raise BackendUnavailable(
                f"kvm backend: no permission to open {KVM_DEVICE} (add yourself to group 'kvm')"
            ) from None
    if name == "model":
        from pcihole.hv.model.system import ModelKvm

        return ModelKvm()
    raise ValueError(f"unknown backend {name!r}: expected 'kvm' or 'model'")


def kvm_available() -> str | None:
    """None where /dev/kvm opens; otherwise the reason it does not."""
    try:
        open_backend("kvm").close()
    except (BackendUnavailable, OSError) as e:
        return str(e)
    return None
