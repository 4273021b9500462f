"""KVM_GET_SREGS / KVM_SET_SREGS on an engine: the segment registers with their hidden parts, the
descriptor-table registers, the control registers and EFER, read from and written into the
engine's CPUX86State.

KVM keeps a segment register as the CPU does (the VMCS / VMCB guest-state area): the selector and
the hidden part loaded with it (base, limit, attributes). KVM_GET_SREGS reports them
(vmx_get_segment / svm_get_segment) and KVM_SET_SREGS loads them as given (__set_sregs ->
kvm_set_segment), whatever the GDT holds. QEMU's SegmentCache is the same thing (the limit scaled
by G, the attributes as the descriptor's high dword), and QEMU's own KVM glue converts between the
two (target/i386/kvm.c: set_seg / get_seg); so does this module. It writes through the uc_context
copy (engine_state.py): Unicorn's uc_reg_write loads a segment only from a descriptor in guest
memory (protected mode) or as selector << 4 with data attributes (real mode), never as given.

The hflags that follow from the segments (CS32 / SS32 / CS64, the CPL from SS.DPL, ADDSEG) are
derived as cpu_x86_load_seg_cache does. The control registers and EFER go through uc_reg_write /
uc_msr_write first, which update the hflags they drive (cpu_x86_update_cr0 / cr4, cpu_load_efer).

Kept and reported but not enforced: segment limits (QEMU's TCG checks none; an access past a limit
that faults on KVM runs on the model).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from unicorn import Uc
from unicorn import x86_const as x86

from pcihole.hv.model.engine_state import (
    DESC_B_MASK,
    DESC_L_MASK,
    HF_ADDSEG_MASK,
    HF_CPL_MASK,
    HF_CS32_MASK,
    HF_CS64_MASK,
    HF_LMA_MASK,
    HF_SS32_MASK,
    R_CS,
    R_DS,
    R_ES,
    R_FS,
    R_GS,
    R_SS,
    EngineState,
    SegmentCache,
)
from pcihole.hv.msr_index import MSR_EFER
from pcihole.hv.uapi import kvm_segment, kvm_sregs
from pcihole.hv.x86_cpu_state import X86_CR0_PE

#: kvm_sregs' segment registers and QEMU's index of each (R_ES, R_CS, ...).
SEGMENTS = (("es", R_ES), ("cs", R_CS), ("ss", R_SS), ("ds", R_DS), ("fs", R_FS), ("gs", R_GS))
# Descriptor attribute bits in SegmentCache.flags (QEMU's DESC_*_SHIFT: the descriptor's high dword).
_TYPE_SHIFT, _S_SHIFT, _DPL_SHIFT, _P_SHIFT = 8, 12, 13, 15
_AVL_SHIFT, _L_SHIFT, _DB_SHIFT, _G_SHIFT = 20, 21, 22, 23
# What KVM_SET_SREGS may change without the engine noticing: everything from apic_base on (the
# APIC base and the interrupt bitmap are the vCPU's, not the engine's).
_ENGINE_BYTES = kvm_sregs.apic_base.offset


def kvm_segment_of(seg: SegmentCache) -> kvm_segment:
    """A SegmentCache as KVM_GET_SREGS reports it (QEMU's set_seg): unusable where not present."""
    flags = seg.flags
    present = (flags >> _P_SHIFT) & 1
    return kvm_segment(
        base=seg.base,
        limit=seg.limit,
        selector=seg.selector,
        type=(flags >> _TYPE_SHIFT) & 0xF,
        present=present,
        dpl=(flags >> _DPL_SHIFT) & 3,
        db=(flags >> _DB_SHIFT) & 1,
        s=(flags >> _S_SHIFT) & 1,
        l=(flags >> _L_SHIFT) & 1,
        g=(flags >> _G_SHIFT) & 1,
        avl=(flags >> _AVL_SHIFT) & 1,
        unusable=0 if present else 1,
    )


def segment_cache_of(seg: kvm_segment) -> SegmentCache:
    """A kvm_segment as the engine holds it (QEMU's get_seg). An unusable segment keeps its other
    attributes with P clear, as VMX keeps them in the access rights beside the unusable bit, so
    KVM_GET_SREGS reads back what was set."""
    present = 0 if seg.unusable else seg.present
    flags = (
        (seg.type & 0xF) << _TYPE_SHIFT
        | (seg.s & 1) << _S_SHIFT
        | (seg.dpl & 3) << _DPL_SHIFT
        | (present & 1) << _P_SHIFT
        | (seg.avl & 1) << _AVL_SHIFT
        | (seg.l & 1) << _L_SHIFT
        | (seg.db & 1) << _DB_SHIFT
        | (seg.g & 1) << _G_SHIFT
    )
    return SegmentCache(seg.selector, seg.base, seg.limit, flags)


def segment_hflags(hflags: int, cr0: int, segs: list[SegmentCache]) -> int:
    """`hflags` with what cpu_x86_load_seg_cache derives from CS and SS (CS32, SS32, CS64, CPL) and
    from the data segments' bases (ADDSEG: QEMU adds DS / ES / SS bases only where one is not 0,
    and always in real mode or 16-bit code), for the segments `segs` (QEMU's R_* order)."""
    cs, ss = segs[R_CS], segs[R_SS]
    hflags &= ~(HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK | HF_CPL_MASK | HF_ADDSEG_MASK)
    hflags |= ss.dpl
    if hflags & HF_LMA_MASK and cs.flags & DESC_L_MASK:
        return hflags | HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK  # zero bases assumed
    if cs.flags & DESC_B_MASK:
        hflags |= HF_CS32_MASK
    if ss.flags & DESC_B_MASK:
        hflags |= HF_SS32_MASK
    if not cr0 & X86_CR0_PE or not hflags & HF_CS32_MASK or segs[R_DS].base | segs[R_ES].base | ss.base:
        hflags |= HF_ADDSEG_MASK
    return hflags


def load_sregs(
    uc: Uc, state: EngineState, sregs: kvm_sregs, write_efer: Callable[[int], None] | None = None
) -> None:
    """KVM_SET_SREGS into the engine `uc` (`state`: its EngineState, whose layout is checked).
    `write_efer` writes EFER where the engine's MSR intercept is on (msr_intercept.py's native);
    a fresh engine's is not."""
    # Only the control registers that change are written: a write flushes the engine's TLB, which
    # a paused callback's access may hold. CR4 and EFER before CR0: setting CR0.PG with EFER.LME
    # is what enters long mode (cpu_x86_update_cr0), as on the CPU.
    state.load()
    for reg, n in ((x86.UC_X86_REG_CR3, 3), (x86.UC_X86_REG_CR4, 4)):
        if state.cr(n) != getattr(sregs, f"cr{n}"):
            uc.reg_write(reg, getattr(sregs, f"cr{n}"))
    if uc.msr_read(MSR_EFER) != sregs.efer:
        (write_efer or (lambda value: uc.msr_write(MSR_EFER, value)))(sregs.efer)
    for reg, n in ((x86.UC_X86_REG_CR0, 0), (x86.UC_X86_REG_CR2, 2)):
        if state.cr(n) != getattr(sregs, f"cr{n}"):
            uc.reg_write(reg, getattr(sregs, f"cr{n}"))
    state.load()
    for name, index in SEGMENTS:
        state.set_segment(index, segment_cache_of(getattr(sregs, name)))
    for name in ("tr", "ldt"):
        state.set_table(name, segment_cache_of(getattr(sregs, name)))
    for name in ("gdt", "idt"):
        table = getattr(sregs, name)
        state.set_table(name, SegmentCache(0, table.base, table.limit, 0))
    state.hflags = segment_hflags(state.hflags, state.cr(0), [state.segment(i) for i in range(len(SEGMENTS))])
    state.store()


def read_sregs(uc: Uc, state: EngineState, given: kvm_sregs) -> kvm_sregs:
    """KVM_GET_SREGS from the engine: segments with their hidden parts, descriptor tables, control
    registers and EFER as the guest left them (it loads its own GDT and switches mode itself);
    CR8, the APIC base and the interrupt bitmap as KVM_SET_SREGS `given` them."""
    state.load()
    sregs = kvm_sregs.from_buffer_copy(given)
    for name, index in SEGMENTS:
        setattr(sregs, name, kvm_segment_of(state.segment(index)))
    for name in ("tr", "ldt"):
        setattr(sregs, name, kvm_segment_of(state.table(name)))
    for name in ("gdt", "idt"):
        table = state.table(name)
        getattr(sregs, name).base = table.base
        getattr(sregs, name).limit = table.limit
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4 = (state.cr(n) for n in (0, 2, 3, 4))
    sregs.efer = uc.msr_read(MSR_EFER)
    return sregs


def engine_holds(engine: kvm_sregs, sregs: kvm_sregs) -> bool:
    """True if KVM_SET_SREGS of `sregs` changes nothing an engine holding `engine` (read_sregs)
    holds: a VMM writing back what it read, or changing only the APIC base."""
    return ctypes.string_at(ctypes.addressof(engine), _ENGINE_BYTES) == ctypes.string_at(
        ctypes.addressof(sregs), _ENGINE_BYTES
    )
