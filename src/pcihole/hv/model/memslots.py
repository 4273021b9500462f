"""KVM_SET_USER_MEMORY_REGION, modelled check by check (virt/kvm/kvm_main.c, Linux 6.x).

Every check is evaluated in the kernel's order, because the first failing one decides the errno
(docs/kvm-memslot-rules.md, with the kernel sources). The seed's KVM_MEM_PCI_HOLE (v2) is folded in
where the patch put it. `userspace_addr` is never dereferenced here: the kernel only checks it
against the user address limit, and a bad HVA surfaces later, as a fault in KVM_RUN.
"""

from __future__ import annotations

import bisect
import errno
import mmap
from dataclasses import dataclass, field
from enum import Enum

from pcihole.host.mman import PAGE_SHIFT, PAGE_SIZE
from pcihole.hv.model.capabilities import KVM_ADDRESS_SPACE_NUM, KVM_MEM_SLOTS_NUM, KVM_USER_MEM_SLOTS
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.proposed import KVM_MEM_PCI_HOLE
from pcihole.hv.uapi import KVM_DIRTY_LOG_INITIALLY_SET, KvmMemFlag

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

KVM_MEM_LOG_DIRTY_PAGES = int(KvmMemFlag.KVM_MEM_LOG_DIRTY_PAGES)
KVM_MEM_READONLY = int(KvmMemFlag.KVM_MEM_READONLY)

# kvm_vm_ioctl: KVM_SET_USER_MEMORY_REGION_V1_FLAGS, plus the seed's flag (the model speaks the v1
# ioctl of a kernel carrying the PCI_HOLE series; there bit 2 is PCI_HOLE, not GUEST_MEMFD).
KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_PCI_HOLE

# include/linux/kvm_host.h: KVM_MEM_MAX_NR_PAGES = (1UL << 31) - 1.
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1

# arch/x86/include/asm/page_64_types.h: TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE with 4-level paging;
# access_ok() accepts [addr, addr + size) when addr + size <= that and does not wrap.
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE

# arch/x86/kvm/mmu.h kvm_mmu_max_gfn(): (1 << (max_gpa_bits - PAGE_SHIFT)) - 1 with 52 bits when the
# MMU shadows guest page tables (this host's software KVM; measured: last gfn 2^40 - 1 is accepted,
# 2^40 is EINVAL).
KVM_MMU_MAX_GPA_BITS = 52
KVM_MMU_MAX_GFN = (1 << (KVM_MMU_MAX_GPA_BITS - PAGE_SHIFT)) - 1

ULONG_MAX = U64


class MemslotChange(Enum):
    """enum kvm_mr_change."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags-only"


@dataclass(eq=False)
class Memslot:
    """struct kvm_memory_slot, the parts the model needs."""

    id: int
    as_id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    # ALIGN(npages, 64) / 8 bytes, bit i = page base_gfn + i; None unless LOG_DIRTY_PAGES.
    dirty_bitmap: mmap.mmap | None = field(default=None, repr=False)

    @property
    def gpa(self) -> int:
        return self.base_gfn << PAGE_SHIFT

    @property
    def size(self) -> int:
        return self.npages << PAGE_SHIFT

    @property
    def last(self) -> int:
        """The last guest-physical byte (inclusive), so a slot may end at 2**64 - 1."""
        return self.gpa + self.size - 1

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def pci_hole(self) -> bool:
        return bool(self.flags & KVM_MEM_PCI_HOLE)

    @property
    def logs_dirty(self) -> bool:
        return self.dirty_bitmap is not None

    def describe(self) -> str:
        return f"slot {self.id} [{self.gpa:#x}, {self.last:#x}] flags={self.flags:#x}"


def kvm_dirty_bitmap_bytes(npages: int) -> int:
    """include/linux/kvm_host.h kvm_dirty_bitmap_bytes: ALIGN(npages, BITS_PER_LONG) / 8."""
    return (npages + 63) // 64 * 8


def memslot_detail(slot: int, flags: int, gpa: int, size: int, hva: int) -> str:
    last = f"{gpa + size - 1:#x}" if size else "-"
    return f"slot={slot}, flags={flags:#x}, gpa=[{gpa:#x}, {last}], size={size:#x}, hva={hva:#x}"


def access_ok(addr: int, size: int) -> bool:
    """arch/x86/include/asm/uaccess_64.h __access_ok for a non-constant size: no wrap, below the limit."""
    end = addr + size
    return end <= U64 and end <= TASK_SIZE_MAX


def check_memory_region_flags(flags: int) -> bool:
    """check_memory_region_flags with the seed's v2 additions (include/uapi/linux/kvm.h, kvm_main.c).

    `valid` is LOG_DIRTY_PAGES | READONLY (x86 has readonly memory for this VM type) | PCI_HOLE,
    and "KVM_MEM_PCI_HOLE ... is mutually exclusive with KVM_MEM_LOG_DIRTY_PAGES and with
    KVM_MEM_READONLY" (v2 api.rst).
    """
    valid = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_PCI_HOLE
    if flags & ~valid:
        return False
    return not (flags & KVM_MEM_PCI_HOLE and flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY))


class MemslotTable:
    """The memslots of one VM (struct kvm_memslots, one address space) and the rules that change them.

    `generation` increases on every committed change, like kvm_memslots.generation, so that the
    vCPUs rebuild their view of guest memory before they run again.
    """

    def __init__(self) -> None:
        self.by_id: dict[int, Memslot] = {}
        # Sorted by base_gfn; slots never overlap, so this also sorts them by their last gfn.
        self._by_gfn: list[Memslot] = []
        self._starts: list[int] = []
        self.generation = 0
        self.nr_memslot_pages = 0
        # kvm->manual_dirty_log_protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's args[0]).
        self.manual_dirty_log_protect = 0

    # --- lookups -----------------------------------------------------------------------------------

    def __iter__(self):
        return iter(self._by_gfn)

    def __len__(self) -> int:
        return len(self._by_gfn)

    def find_gfn(self, gfn: int) -> Memslot | None:
        """search_memslots: the slot mapping `gfn`, or None."""
        i = bisect.bisect_right(self._starts, gfn) - 1
        if i >= 0:
            slot = self._by_gfn[i]
            if gfn < slot.base_gfn + slot.npages:
                return slot
        return None

    def find_gpa(self, gpa: int) -> Memslot | None:
        return self.find_gfn(gpa >> PAGE_SHIFT)

    def overlapping(self, start_gfn: int, end_gfn: int) -> list[Memslot]:
        """Slots intersecting [start_gfn, end_gfn), in gfn order."""
        i = max(bisect.bisect_right(self._starts, start_gfn) - 1, 0)
        out = []
        for slot in self._by_gfn[i:]:
            if slot.base_gfn >= end_gfn:
                break
            if slot.base_gfn + slot.npages > start_gfn:
                out.append(slot)
        return out

    # --- KVM_SET_USER_MEMORY_REGION -----------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> MemslotChange | None:
        """Apply one KVM_SET_USER_MEMORY_REGION; returns what changed (None for a no-op).

        Raises ModelKvmError with the errno of the first failing check, leaving the table unchanged.
        """
        # struct kvm_userspace_memory_region holds u32 slot/flags and u64 addresses: what the
        # caller's integers become once copied into it (as the kvm backend does).
        slot &= U32
        flags &= U32
        gpa = guest_phys_addr & U64
        size = memory_size & U64
        hva = userspace_addr & U64
        detail = memslot_detail(slot, flags, gpa, size, hva)

        def fail(err: int, why: str) -> ModelKvmError:
            return ModelKvmError(err, "KVM_SET_USER_MEMORY_REGION", detail, why)

        # kvm_vm_ioctl: the v1 ioctl takes only the v1 flags.
        if flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
            raise fail(errno.EINVAL, f"flags {flags:#x} outside the v1 flags")
        # kvm_vm_ioctl_set_memory_region: the as_id bits are ignored here.
        if slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
            raise fail(errno.EINVAL, f"slot id {slot & 0xFFFF} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
        # kvm_set_memory_region -> check_memory_region_flags.
        if not check_memory_region_flags(flags):
            raise fail(
                errno.EINVAL, "invalid flag combination (PCI_HOLE excludes READONLY and LOG_DIRTY_PAGES)"
            )
        # kvm_set_memory_region: sizes and addresses.
        if size & (PAGE_SIZE - 1) or size > ULONG_MAX:
            raise fail(errno.EINVAL, "memory_size is not a multiple of PAGE_SIZE")
        if gpa & (PAGE_SIZE - 1):
            raise fail(errno.EINVAL, "guest_phys_addr is not page aligned")
        if flags & KVM_MEM_PCI_HOLE:
            # [PATCH v2 2/3]: a PCI hole has no backing, so the HVA checks are skipped and
            # userspace_addr "must be NULL".
            if hva:
                raise fail(errno.EINVAL, "KVM_MEM_PCI_HOLE needs userspace_addr == 0")
        elif hva & (PAGE_SIZE - 1) or not access_ok(hva, size):
            # "We can read the guest memory with __xxx_user() later on."
            raise fail(errno.EINVAL, "userspace_addr is not page aligned or not below TASK_SIZE_MAX")
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if as_id >= KVM_ADDRESS_SPACE_NUM or id_ >= KVM_MEM_SLOTS_NUM:
            raise fail(
                errno.EINVAL, f"address space {as_id} does not exist (KVM_CAP_MULTI_ADDRESS_SPACE = 0)"
            )
        if gpa + size > U64:
            raise fail(errno.EINVAL, "guest_phys_addr + memory_size wraps around")
        npages = size >> PAGE_SHIFT
        if id_ < KVM_USER_MEM_SLOTS and npages > KVM_MEM_MAX_NR_PAGES:
            raise fail(errno.EINVAL, f"{npages} pages > KVM_MEM_MAX_NR_PAGES")

        old = self.by_id.get(id_)
        base_gfn = gpa >> PAGE_SHIFT
        if not npages:
            if old is None:
                raise fail(errno.EINVAL, f"cannot delete slot {id_}: it does not exist")
            self._commit_delete(old)
            return MemslotChange.DELETE

        if old is None:
            if self.nr_memslot_pages + npages > ULONG_MAX:
                raise fail(errno.EINVAL, "the VM's page count would overflow")
            change = MemslotChange.CREATE
        else:
            if hva != old.userspace_addr or npages != old.npages:
                raise fail(errno.EINVAL, f"cannot change the size or userspace_addr of live {old.describe()}")
            if (flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_PCI_HOLE):
                raise fail(errno.EINVAL, f"cannot toggle READONLY or PCI_HOLE on live {old.describe()}")
            if base_gfn != old.base_gfn:
                change = MemslotChange.MOVE
            elif flags != old.flags:
                change = MemslotChange.FLAGS_ONLY
            else:
                return None  # "Nothing to change."

        if change in (MemslotChange.CREATE, MemslotChange.MOVE):
            # kvm_check_memslot_overlap: another id in this address space intersecting the range.
            for other in self.overlapping(base_gfn, base_gfn + npages):
                if other.id != id_:
                    raise fail(errno.EEXIST, f"overlaps {other.describe()}")
            # x86 kvm_arch_prepare_memory_region, after the dirty bitmap (which cannot fail here).
            if base_gfn + npages - 1 > KVM_MMU_MAX_GFN:
                raise fail(errno.EINVAL, f"last gfn above kvm_mmu_max_gfn() ({KVM_MMU_MAX_GFN:#x})")

        new = Memslot(id_, as_id, base_gfn, npages, flags, hva)
        new.dirty_bitmap = self._prepare_dirty_bitmap(old, new)
        self._commit(old, new)
        return change

    def _prepare_dirty_bitmap(self, old: Memslot | None, new: Memslot) -> mmap.mmap | None:
        """kvm_prepare_memory_region: reuse the old bitmap when both log, else a fresh one."""
        if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return None
        if old is not None and old.dirty_bitmap is not None:
            return old.dirty_bitmap
        # Anonymous memory, zero-filled lazily by the host: a slot of KVM_MEM_MAX_NR_PAGES has a
        # 256 MiB bitmap, and the kernel allocates it (vmalloc) without touching it either.
        bitmap = mmap.mmap(-1, kvm_dirty_bitmap_bytes(new.npages))
        if self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            # bitmap_set(new->dirty_bitmap, 0, new->npages)
            full, rest = divmod(new.npages, 8)
            bitmap[:full] = b"\xff" * full
            if rest:
                bitmap[full] = (1 << rest) - 1
        return bitmap

    def _remove(self, old: Memslot) -> None:
        i = bisect.bisect_left(self._starts, old.base_gfn)
        assert self._by_gfn[i] is old
        del self._by_gfn[i], self._starts[i]
        self.nr_memslot_pages -= old.npages

    def _commit_delete(self, old: Memslot) -> None:
        del self.by_id[old.id]
        self._remove(old)
        self.generation += 1

    def _commit(self, old: Memslot | None, new: Memslot) -> None:
        """kvm_commit_memory_region: swap the slot in, keep the gfn index sorted."""
        if old is not None:
            self._remove(old)
        self.by_id[new.id] = new
        i = bisect.bisect_left(self._starts, new.base_gfn)
        self._by_gfn.insert(i, new)
        self._starts.insert(i, new.base_gfn)
        self.nr_memslot_pages += new.npages
        self.generation += 1
