"""vCPU start states, the same on every backend: 32-bit flat protected mode and 64-bit long mode.

The 32-bit state is the PVH entry state (xen/include/public/arch-x86/hvm/start_info.h and
docs/misc/pvh.pandoc): CR0.PE set, paging off, CS a flat 32-bit code segment and DS/ES/SS flat
32-bit data segments (base 0, limit 4 GiB), EFLAGS bit 1 only, EBX = guest-physical address of
`struct hvm_start_info`. The GDTR is left unspecified, as the PVH spec allows: the hidden parts of
the segment registers are loaded directly through KVM_SET_SREGS.

The 64-bit state identity-maps the low 4 GiB with 2 MiB pages (1 GiB pages need pdpe1gb in the guest
CPUID: without it the guest triple-faults, measured on the development hosts' KVM), so ECAM
windows below 4 GiB are reachable.
"""

from __future__ import annotations

from collections.abc import Callable

from pcihole.hv.interface import Vcpu
from pcihole.hv.uapi import kvm_regs, kvm_segment, kvm_sregs

# Control and flag register bits (Intel SDM Vol. 3A, 2.5 and 2.2.1).
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
X86_EFLAGS_FIXED = 1 << 1

# Segment descriptor types (SDM Vol. 3A, 3.4.5.1), with the accessed bit set.
SEG_TYPE_CODE_EXEC_READ_ACCESSED = 0xB
SEG_TYPE_DATA_READ_WRITE_ACCESSED = 0x3
SEG_TYPE_TSS_BUSY = 0xB

# Selectors of a conventional flat GDT (null, code, data, TSS); informational since no GDT is loaded.
SELECTOR_CODE = 0x08
SELECTOR_DATA = 0x10
SELECTOR_TSS = 0x18

# Page-table entry bits (SDM Vol. 3A, 4.5).
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7
PAGE_TABLE_BYTES = 4096
LONG_MODE_PAGE_TABLES_BYTES = 6 * PAGE_TABLE_BYTES  # PML4 + PDPT + 4 PDs (4 GiB of 2 MiB pages)


def _flat_segment(selector: int, type_: int, *, code64: bool = False) -> kvm_segment:
    return kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=type_,
        present=1,
        dpl=0,
        db=0 if code64 else 1,
        s=1,
        l=1 if code64 else 0,
        g=1,
    )


def _load_flat_segments(sregs: kvm_sregs, *, long_mode: bool) -> None:
    sregs.cs = _flat_segment(SELECTOR_CODE, SEG_TYPE_CODE_EXEC_READ_ACCESSED, code64=long_mode)
    data = _flat_segment(SELECTOR_DATA, SEG_TYPE_DATA_READ_WRITE_ACCESSED)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    # A busy TSS: VMX refuses to enter with an unusable TR even though these guests never switch tasks.
    sregs.tr = kvm_segment(base=0, limit=0xFFFF, selector=SELECTOR_TSS, type=SEG_TYPE_TSS_BUSY, present=1)


def enter_protected_mode_flat(vcpu: Vcpu, entry: int, *, ebx: int = 0, esp: int = 0) -> None:
    """The PVH entry state: 32-bit flat protected mode, paging off, EIP = entry, EBX = start info."""
    sregs = vcpu.get_sregs()
    _load_flat_segments(sregs, long_mode=False)
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET
    sregs.cr3 = sregs.cr4 = sregs.efer = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(kvm_regs(rip=entry, rbx=ebx, rsp=esp, rflags=X86_EFLAGS_FIXED))


def identity_page_tables(base: int) -> bytes:
    """PML4, PDPT and four page directories at `base` identity-mapping [0, 4 GiB) with 2 MiB pages."""
    if base % PAGE_TABLE_BYTES:
        raise ValueError(f"page tables must be 4 KiB aligned, not at {base:#x}")
    pml4 = bytearray(PAGE_TABLE_BYTES)
    pdpt = bytearray(PAGE_TABLE_BYTES)
    pml4[0:8] = (base + PAGE_TABLE_BYTES | PTE_PRESENT | PTE_WRITABLE).to_bytes(8, "little")
    pds = bytearray()
    for gib in range(4):
        pd_addr = base + (2 + gib) * PAGE_TABLE_BYTES
        pdpt[gib * 8 : gib * 8 + 8] = (pd_addr | PTE_PRESENT | PTE_WRITABLE).to_bytes(8, "little")
        for i in range(512):
            phys = (gib << 30) | (i << 21)
            pds += (phys | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE).to_bytes(8, "little")
    return bytes(pml4 + pdpt + pds)


def enter_long_mode(
    vcpu: Vcpu, entry: int, *, page_tables_gpa: int, write_guest: Callable[[int, bytes], None], rsp: int = 0
) -> None:
    """64-bit long mode with the low 4 GiB identity-mapped; the tables are written at page_tables_gpa."""
    write_guest(page_tables_gpa, identity_page_tables(page_tables_gpa))
    sregs = vcpu.get_sregs()
    _load_flat_segments(sregs, long_mode=True)
    sregs.cr3 = page_tables_gpa
    sregs.cr4 = X86_CR4_PAE
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    vcpu.set_regs(kvm_regs(rip=entry, rsp=rsp, rflags=X86_EFLAGS_FIXED))
