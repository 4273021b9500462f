"""KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG (kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect).

Bitmap layout as in the kernel: native little-endian unsigned longs, bit i = page base_gfn + i, so
bit i lives in byte i // 8 at bit i % 8. The model has no dirty ring, so kvm_use_dirty_bitmap() is
always true and ENXIO never happens.
"""

from __future__ import annotations

import errno

from pcihole.hv.model.capabilities import KVM_ADDRESS_SPACE_NUM, KVM_DIRTY_LOG_MANUAL_CAPS, KVM_USER_MEM_SLOTS
from pcihole.hv.model.errors import ModelKvmError
from pcihole.hv.model.memslots import U32, U64, Memslot, MemslotTable, kvm_dirty_bitmap_bytes
from pcihole.hv.uapi import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE


def mark_page_dirty(slot: Memslot, gfn: int) -> None:
    """mark_page_dirty_in_slot: set the page's bit if the slot logs."""
    bitmap = slot.dirty_bitmap
    if bitmap is not None:
        rel = gfn - slot.base_gfn
        bitmap[rel >> 3] |= 1 << (rel & 7)


def _logging_slot(table: MemslotTable, slot: int, ioctl: str, detail: str) -> Memslot:
    """The id checks shared by GET and CLEAR: EINVAL for a bad id, ENOENT for no slot or no bitmap."""
    as_id, id_ = slot >> 16, slot & 0xFFFF
    if as_id >= KVM_ADDRESS_SPACE_NUM or id_ >= KVM_USER_MEM_SLOTS:
        raise ModelKvmError(errno.EINVAL, ioctl, detail, "no such address space or slot id")
    return table.by_id.get(id_)  # type: ignore[return-value]  # None handled by the callers


def get_dirty_log(table: MemslotTable, slot: int) -> bytes:
    """kvm_get_dirty_log_protect: the slot's bitmap; cleared as it is read unless manual protect is on."""
    slot &= U32
    detail = f"slot={slot}"
    memslot = _logging_slot(table, slot, "KVM_GET_DIRTY_LOG", detail)
    if memslot is None or memslot.dirty_bitmap is None:
        raise ModelKvmError(
            errno.ENOENT, "KVM_GET_DIRTY_LOG", detail, "no slot, or it does not log dirty pages"
        )
    n = kvm_dirty_bitmap_bytes(memslot.npages)
    bitmap = memslot.dirty_bitmap
    snapshot = bitmap[:n]
    if not table.manual_dirty_log_protect:
        # Without manual protect KVM xchg()s each word with 0 (and write-protects the pages).
        bitmap[:n] = bytes(n)
    return snapshot


def clear_dirty_log(table: MemslotTable, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
    """kvm_clear_dirty_log_protect: clear page first_page + i for every bit i set in `bitmap`."""
    slot &= U32
    first_page &= U64
    num_pages &= U32  # struct kvm_clear_dirty_log: __u32 num_pages
    detail = f"slot={slot}, first_page={first_page}, num_pages={num_pages}"
    memslot = _logging_slot(table, slot, "KVM_CLEAR_DIRTY_LOG", detail)
    if first_page & 63:
        raise ModelKvmError(errno.EINVAL, "KVM_CLEAR_DIRTY_LOG", detail, "first_page is not a multiple of 64")
    if memslot is None or memslot.dirty_bitmap is None:
        raise ModelKvmError(
            errno.ENOENT, "KVM_CLEAR_DIRTY_LOG", detail, "no slot, or it does not log dirty pages"
        )
    npages = memslot.npages
    if (
        first_page > npages
        or num_pages > npages - first_page
        or (num_pages < npages - first_page and num_pages & 63)
    ):
        raise ModelKvmError(
            errno.EINVAL,
            "KVM_CLEAR_DIRTY_LOG",
            detail,
            f"range outside the slot's {npages} pages, or num_pages not a multiple of 64 short of its end",
        )
    n = kvm_dirty_bitmap_bytes(num_pages)
    mask = bytes(bitmap[:n]).ljust(n, b"\0")
    start = first_page >> 3
    live = memslot.dirty_bitmap
    # atomic_long_fetch_andnot word by word; bits past the slot's end are ignored, the live bitmap
    # never has them set. (first_page is 64-aligned, so [start, start + n) lies inside the bitmap.)
    if any(mask):
        words = int.from_bytes(live[start : start + n], "little")
        live[start : start + n] = (words & ~int.from_bytes(mask, "little")).to_bytes(n, "little")


def enable_manual_dirty_log_protect(table: MemslotTable, args: tuple[int, ...], flags: int = 0) -> None:
    """kvm_vm_ioctl_enable_cap_generic, case KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2."""
    arg0 = args[0] if args else 0
    allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if arg0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        allowed = KVM_DIRTY_LOG_MANUAL_CAPS
    if flags or arg0 & ~allowed:
        raise ModelKvmError(
            errno.EINVAL,
            "KVM_ENABLE_CAP",
            f"cap=KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args={list(args)}",
            "bad options",
        )
    table.manual_dirty_log_protect = arg0
