"""`LapicIrq`: one interrupt message to local APICs (struct kvm_lapic_irq), as the IOAPIC's
redirection entries, the ICR and the LVTs describe it; and the fields' values (asm/apicdef.h)."""

from __future__ import annotations

from dataclasses import dataclass

# arch/x86/include/asm/apicdef.h: delivery modes (ICR / LVT bits 10:8, IOAPIC entry << 8)
APIC_DM_FIXED = 0x000
APIC_DM_LOWEST = 0x100
APIC_DM_SMI = 0x200
APIC_DM_REMRD = 0x300
APIC_DM_NMI = 0x400
APIC_DM_INIT = 0x500
APIC_DM_STARTUP = 0x600
APIC_DM_EXTINT = 0x700
# shorthands (ICR bits 19:18)
APIC_DEST_NOSHORT = 0x00000
APIC_DEST_SELF = 0x40000
APIC_DEST_ALLINC = 0x80000
APIC_DEST_ALLBUT = 0xC0000


@dataclass(frozen=True)
class LapicIrq:
    """struct kvm_lapic_irq: one interrupt message to local APICs."""

    vector: int
    delivery_mode: int = APIC_DM_FIXED
    logical: bool = False  # dest_mode: APIC_DEST_LOGICAL
    level: bool = True  # assert (INIT de-assert is level 0)
    level_triggered: bool = False  # trig_mode
    shorthand: int = APIC_DEST_NOSHORT
    dest_id: int = 0
