"""The ABI proposed in the seed (KVM_MEM_PCI_HOLE, v2) and the reviewer's MMIO fill device.

Neither exists in a real kernel. Their numbers live here, in the model's namespace, and are the
seed's own: on mainline, bit 2 of the memslot flags became KVM_MEM_GUEST_MEMFD (6.8) and capability
187 became KVM_CAP_STEAL_TIME, so the `kvm` backend must never pass them to /dev/kvm.
"""

from __future__ import annotations

# [PATCH v2 2/3] include/uapi/linux/kvm.h: "#define KVM_MEM_PCI_HOLE (1UL << 2)"
KVM_MEM_PCI_HOLE = 1 << 2
# [PATCH v2 2/3] include/uapi/linux/kvm.h: "#define KVM_CAP_PCI_HOLE_MEM 187"
KVM_CAP_PCI_HOLE_MEM = 187

# Sean Christopherson's alternative in the thread: an in-kernel MMIO-bus device that answers reads
# with a fill value. No number was ever proposed; the model picks one far above KVM's range so that
# it can never be confused with a real capability.
KVM_CAP_MMIO_FILL = 0x10000 + 1
# Flags of the model's KVM_REGISTER_MMIO_FILL: writes are dropped in the kernel (default), or exit.
KVM_MMIO_FILL_WRITES_EXIT = 1 << 0
