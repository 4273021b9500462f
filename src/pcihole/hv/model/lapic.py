"""`LocalApic`: one vCPU's in-kernel local APIC, as arch/x86/kvm/lapic.c models it.

- The xAPIC page at IA32_APIC_BASE (0xfee00000 after reset) is the vCPU's own MMIO device, asked
  before the VM's MMIO bus (vcpu_mmio_read / vcpu_mmio_write ask vcpu->arch.apic first):
  apic_mmio_read / apic_mmio_write, kvm_lapic_reg_read / kvm_lapic_reg_write. While the APIC is
  hardware-disabled or in x2APIC mode, reads of the page return all-ones and writes are dropped
  (KVM_X86_QUIRK_LAPIC_MMIO_HOLE, on by default).
- x2APIC: MSRs 0x800-0x8ff (kvm_x2apic_msr_read / kvm_x2apic_msr_write), IA32_APIC_BASE (0x1b,
  kvm_set_apic_base), IA32_TSC_DEADLINE (0x6e0, kvm_set_lapic_tscdeadline_msr), registered in the
  vCPU's MSR table.
- Interrupts: IRR / ISR / TMR as 256-bit integers; the highest IRR vector above PPR is pending
  (apic_has_interrupt_for_ppr), `acknowledge` moves it to ISR (kvm_get_apic_interrupt); EOI clears
  the highest ISR bit (apic_set_eoi) and tells the IOAPIC of a level-triggered one
  (kvm_ioapic_send_eoi). PPR follows TPR and ISR (apic_update_ppr). Before the LAPIC the 8259's
  ExtINT is asked, where LVT0 says ExtINT (kvm_cpu_has_extint, kvm_cpu_get_extint).
- The timer: one-shot, periodic (at least min_timer_period_us = 200 us apart, as KVM limits it)
  and TSC-deadline, on a host timer (host_timer.py) whose expiry delivers the LVT timer vector
  (apic_timer_fn -> apic_timer_expired -> kvm_apic_inject_pending_timer_irqs). The APIC bus
  runs at 1 GHz (APIC_BUS_CYCLE_NS_DEFAULT = 1): a count of N with divide-by-D lasts N * D ns.
- The ICR sends IPIs (kvm_apic_send_ipi): fixed, lowest-priority and NMI to the APICs the
  destination or shorthand selects, this one included. INIT / SIPI are not modelled.

Implements `InterruptSource` (interrupt_source.py) for its vCPU; every method takes the irqchip's
lock, so the timer thread, the VMM (KVM_IRQ_LINE) and the vCPU may call at the same time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcihole.hv.model.cpu_msrs import DEFAULT_MAXPHYADDR
from pcihole.hv.model.host_timer import HostTimer
from pcihole.hv.model.lapic_irq import (
    APIC_DEST_ALLBUT,
    APIC_DEST_ALLINC,
    APIC_DEST_NOSHORT,
    APIC_DEST_SELF,
    APIC_DM_EXTINT,
    APIC_DM_FIXED,
    APIC_DM_LOWEST,
    APIC_DM_NMI,
    LapicIrq,
)
from pcihole.hv.model.msr import MsrFault
from pcihole.hv.msr_index import (
    MSR_IA32_APICBASE,
    MSR_IA32_APICBASE_BSP,
    MSR_IA32_APICBASE_ENABLE,
    MSR_IA32_TSC_DEADLINE,
)

if TYPE_CHECKING:
    from pcihole.hv.model.irqchip import Irqchip
    from pcihole.hv.model.msr import MsrTable
    from pcihole.hv.model.tsc import TscClock

# arch/x86/include/asm/apicdef.h: register offsets in the xAPIC page
APIC_ID = 0x20
APIC_LVR = 0x30
APIC_TASKPRI = 0x80
APIC_ARBPRI = 0x90
APIC_PROCPRI = 0xA0
APIC_EOI = 0xB0
APIC_RRR = 0xC0
APIC_LDR = 0xD0
APIC_DFR = 0xE0
APIC_SPIV = 0xF0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ESR = 0x280
APIC_LVTCMCI = 0x2F0
APIC_ICR = 0x300
APIC_ICR2 = 0x310
APIC_LVTT = 0x320
APIC_LVTTHMR = 0x330
APIC_LVTPC = 0x340
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_LVTERR = 0x370
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0
APIC_SELF_IPI = 0x3F0

APIC_DEFAULT_PHYS_BASE = 0xFEE00000
APIC_PAGE_SIZE = 0x1000
KVM_APIC_REG_SIZE = 0x400  # struct kvm_lapic_state
X2APIC_ENABLE = 1 << 10
MSR_IA32_APICBASE_BASE = 0xFFFFF << 12
APIC_BASE_MSR = 0x800  # x2APIC MSR = APIC_BASE_MSR + (register offset >> 4)
X2APIC_MSR_LAST = 0x8FF

APIC_VERSION = 0x14  # lapic.c: "integrated APIC" version of a Pentium 4 / Xeon
KVM_APIC_NR_LVT_ENTRIES = 6  # timer, thermal, perf, LINT0, LINT1, error (no CMCI: mcg_cap lacks it)
APIC_LVR_VALUE = APIC_VERSION | (KVM_APIC_NR_LVT_ENTRIES - 1) << 16  # 0x50014

APIC_SPIV_APIC_ENABLED = 1 << 8
APIC_LVT_MASKED = 1 << 16
APIC_LVT_LEVEL_TRIGGER = 1 << 15
APIC_LVT_REMOTE_IRR = 1 << 14
APIC_INPUT_POLARITY = 1 << 13
APIC_SEND_PENDING = 1 << 12
APIC_MODE_MASK = 0x700
APIC_VECTOR_MASK = 0xFF
APIC_DEST_LOGICAL = 0x800
APIC_INT_ASSERT = 0x4000
APIC_INT_LEVELTRIG = 0x8000
APIC_SHORT_MASK = 0xC0000
APIC_ICR_BUSY = 0x1000
APIC_DFR_FLAT = 0xFFFFFFFF
APIC_DFR_CLUSTER = 0x0FFFFFFF
APIC_LDR_MASK = 0xFF << 24
APIC_LVT_TIMER_ONESHOT = 0
APIC_LVT_TIMER_PERIODIC = 1 << 17
APIC_LVT_TIMER_TSCDEADLINE = 2 << 17
APIC_BROADCAST = 0xFF

LVT_MASK = APIC_LVT_MASKED | APIC_SEND_PENDING | APIC_VECTOR_MASK
LINT_MASK = LVT_MASK | APIC_MODE_MASK | APIC_INPUT_POLARITY | APIC_LVT_REMOTE_IRR | APIC_LVT_LEVEL_TRIGGER
LVT_REGISTERS = (APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR)
# apic_lvt_mask[], in LVT_REGISTERS' order (the timer's mode bits are added from timer_mode_mask)
APIC_LVT_WRITE_MASKS = {
    APIC_LVTT: LVT_MASK,
    APIC_LVTTHMR: LVT_MASK | APIC_MODE_MASK,
    APIC_LVTPC: LVT_MASK | APIC_MODE_MASK,
    APIC_LVT0: LINT_MASK,
    APIC_LVT1: LINT_MASK,
    APIC_LVTERR: LVT_MASK,
}
TIMER_MODE_MASK = APIC_LVT_TIMER_PERIODIC | APIC_LVT_TIMER_TSCDEADLINE

APIC_BUS_CYCLE_NS = 1  # APIC_BUS_CYCLE_NS_DEFAULT
MIN_TIMER_PERIOD_NS = 200_000  # min_timer_period_us = 200

# kvm_lapic_readable_reg_mask: the registers a read may name (xAPIC adds ARBPRI, DFR, ICR2)
_READABLE = frozenset(
    [APIC_ID, APIC_LVR, APIC_TASKPRI, APIC_PROCPRI, APIC_LDR, APIC_SPIV, APIC_ESR, APIC_ICR]
    + [APIC_ISR + 0x10 * i for i in range(8)]
    + [APIC_TMR + 0x10 * i for i in range(8)]
    + [APIC_IRR + 0x10 * i for i in range(8)]
    + list(LVT_REGISTERS)
    + [APIC_TMICT, APIC_TMCCT, APIC_TDCR]
)
_READABLE_XAPIC_ONLY = frozenset([APIC_ARBPRI, APIC_DFR, APIC_ICR2])

U32 = 0xFFFFFFFF


def _highest(bits: int) -> int:
    """apic_find_highest_vector: the highest set bit of a 256-bit register, or -1."""
    return bits.bit_length() - 1


class LocalApic:
    """One vCPU's LAPIC. `vcpu` is a ModelVcpu: interrupt_pending(), nmi(), msrs, tsc."""

    def __init__(self, irqchip: Irqchip, vcpu) -> None:
        self.irqchip = irqchip
        self.vcpu = vcpu
        self.vcpu_id: int = vcpu.id
        self.timer = HostTimer(f"lapic{self.vcpu_id}-timer", self._timer_expired)
        self._regs: dict[int, int] = {}
        self.irr = self.isr = self.tmr = 0
        # kvm_lapic_reset(vcpu, false) + kvm_lapic_set_base at vCPU creation: enabled, xAPIC,
        # BSP for vCPU 0 (kvm_vcpu_is_reset_bsp: bsp_vcpu_id is 0 unless KVM_SET_BOOT_CPU_ID).
        self.apic_base = APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE
        if self.vcpu_id == 0:
            self.apic_base |= MSR_IA32_APICBASE_BSP
        self.base_address = APIC_DEFAULT_PHYS_BASE
        self.divide_count = 2
        self.period_ns = 0
        self.target_ns = 0  # lapic_timer.target_expiration (host monotonic ns), 0: none
        self.tscdeadline = 0
        self.timer_mode = APIC_LVT_TIMER_ONESHOT
        # What KVM derives from the guest's CPUID (kvm_vcpu_after_set_cpuid -> kvm_apic_set_version,
        # apic->lapic_timer.timer_mode_mask): before KVM_SET_CPUID2 the LVT timer has no mode bits
        # (one-shot only) and IA32_APIC_BASE refuses x2APIC, as on this host's kernel.
        self.timer_mode_mask = 0
        self.x2apic_allowed = False
        # The guest's MAXPHYADDR (vcpu->arch.maxphyaddr, cpuid_query_maxphyaddr of its CPUID: 36
        # before KVM_SET_CPUID2): the bits at and above it are reserved in IA32_APIC_BASE.
        self.maxphyaddr = DEFAULT_MAXPHYADDR
        self.interrupts_accepted = 0
        self._reset()

    def _reset(self) -> None:
        """kvm_lapic_reset: version, every LVT masked (LVT0 ExtINT on the BSP:
        KVM_X86_QUIRK_LINT0_REENABLED), DFR flat, SVR 0xff (software-disabled), TPR 0, divide 2."""
        self._regs = dict.fromkeys(
            (APIC_TASKPRI, APIC_PROCPRI, APIC_LDR, APIC_ESR, APIC_ICR, APIC_ICR2, APIC_TDCR, APIC_TMICT), 0
        )
        self._regs[APIC_ID] = (self.vcpu_id & 0xFF) << 24
        self._regs[APIC_LVR] = APIC_LVR_VALUE
        for reg in LVT_REGISTERS:
            self._regs[reg] = APIC_LVT_MASKED
        if self.apic_base & MSR_IA32_APICBASE_BSP:
            self._regs[APIC_LVT0] = APIC_DM_EXTINT
        self._regs[APIC_DFR] = APIC_DFR_FLAT
        self._regs[APIC_SPIV] = 0xFF
        self.irr = self.isr = self.tmr = 0
        self._update_divide_count()

    def set_cpuid(self, *, x2apic: bool, tsc_deadline: bool, maxphyaddr: int) -> None:
        """KVM_SET_CPUID2: periodic mode always, TSC-deadline where CPUID.1:ECX[24] says so; x2APIC
        and the reserved bits of IA32_APIC_BASE as the new table says."""
        with self.irqchip.locked():
            self.timer_mode_mask = APIC_LVT_TIMER_PERIODIC | (
                APIC_LVT_TIMER_TSCDEADLINE if tsc_deadline else 0
            )
            self.x2apic_allowed = x2apic
            self.maxphyaddr = maxphyaddr

    # --- state the rest of the irqchip asks ----------------------------------------------------------

    def hw_enabled(self) -> bool:
        return bool(self.apic_base & MSR_IA32_APICBASE_ENABLE)

    def x2apic_mode(self) -> bool:
        return bool(self.apic_base & X2APIC_ENABLE)

    def sw_enabled(self) -> bool:
        return bool(self._regs[APIC_SPIV] & APIC_SPIV_APIC_ENABLED)

    def present(self) -> bool:
        """kvm_apic_present: in-kernel and hardware-enabled."""
        return self.hw_enabled()

    def enabled(self) -> bool:
        """apic_enabled: hardware- and software-enabled (what a fixed interrupt needs)."""
        return self.hw_enabled() and self.sw_enabled()

    def register(self, offset: int) -> int:
        """The raw value of the register at `offset` (tests, KVM_GET_LAPIC)."""
        with self.irqchip.locked():
            return self._read_reg(offset)

    def kick(self) -> None:
        """kvm_vcpu_kick, once the irqchip's lock is released."""
        self.irqchip.later(self.vcpu.interrupt_pending)

    # --- interrupts in (__apic_accept_irq) ----------------------------------------------------------

    def accept_irq(self, irq: LapicIrq) -> int:
        """__apic_accept_irq: 1 if the interrupt was accepted, else 0."""
        mode = irq.delivery_mode
        if mode in (APIC_DM_FIXED, APIC_DM_LOWEST):
            if irq.level_triggered and not irq.level:
                return 0
            if not self.enabled():
                return 0
            bit = 1 << irq.vector
            if irq.level_triggered:
                self.tmr |= bit
            else:
                self.tmr &= ~bit
            self.irr |= bit
            self.interrupts_accepted += 1
            self.kick()
            return 1
        if mode == APIC_DM_NMI:
            self.irqchip.later(self.vcpu.nmi)
            return 1
        if mode == APIC_DM_EXTINT:
            return 0  # "Should only be called by kvm_apic_local_deliver() with LVT0": the PIC's path
        return 0  # SMI, INIT, SIPI: not modelled

    def local_deliver(self, lvt_reg: int) -> int:
        """kvm_apic_local_deliver: an LVT's interrupt, unless the LVT is masked."""
        reg = self._regs[lvt_reg]
        if not self.hw_enabled() or reg & APIC_LVT_MASKED:
            return 0
        irq = LapicIrq(
            vector=reg & APIC_VECTOR_MASK,
            delivery_mode=reg & APIC_MODE_MASK,
            level_triggered=bool(reg & APIC_LVT_LEVEL_TRIGGER),
        )
        return self.accept_irq(irq)

    def match_dest(self, source: LocalApic | None, shorthand: int, dest: int, logical: bool) -> bool:
        """kvm_apic_match_dest."""
        if shorthand == APIC_DEST_NOSHORT:
            return self._match_logical(dest) if logical else self._match_physical(dest)
        if shorthand == APIC_DEST_SELF:
            return self is source
        if shorthand == APIC_DEST_ALLINC:
            return True
        if shorthand == APIC_DEST_ALLBUT:
            return self is not source
        return False

    def _match_physical(self, mda: int) -> bool:
        """kvm_apic_match_physical_addr."""
        if self.x2apic_mode():
            return mda == 0xFFFFFFFF or mda == self.vcpu_id
        return mda == APIC_BROADCAST or mda == self._regs[APIC_ID] >> 24

    def _match_logical(self, mda: int) -> bool:
        """kvm_apic_match_logical_addr: flat (a bit per APIC) or cluster model, by DFR."""
        ldr = self._regs[APIC_LDR]
        if self.x2apic_mode():
            return mda == 0xFFFFFFFF or ((ldr >> 16) == (mda >> 16) and (ldr & mda & 0xFFFF) != 0)
        logical_id = ldr >> 24
        mda &= 0xFF
        if mda == APIC_BROADCAST:
            return True
        if self._regs[APIC_DFR] == APIC_DFR_FLAT:
            return (logical_id & mda) != 0
        if self._regs[APIC_DFR] == APIC_DFR_CLUSTER:
            return (logical_id >> 4) == (mda >> 4) and (logical_id & mda & 0xF) != 0
        return False

    # --- interrupts out (InterruptSource) -------------------------------------------------------------

    def _update_ppr(self) -> int:
        """apic_update_ppr: PPR = TPR if TPR's class is at least the highest ISR's, else that class."""
        tpr = self._regs[APIC_TASKPRI]
        isr = _highest(self.isr)
        isrv = isr & 0xF0 if isr >= 0 else 0
        ppr = tpr & 0xFF if (tpr & 0xF0) >= isrv else isrv & 0xF0
        self._regs[APIC_PROCPRI] = ppr
        return ppr

    def _apic_interrupt(self) -> int:
        """kvm_apic_has_interrupt: the highest IRR vector whose class is above PPR, or -1."""
        if not self.present():
            return -1
        ppr = self._update_ppr()
        highest = _highest(self.irr)
        if highest < 0 or (highest & 0xF0) <= ppr:
            return -1
        return highest

    def accepts_pic_interrupt(self) -> bool:
        """kvm_apic_accept_pic_intr: LVT0 unmasked in ExtINT mode, or the APIC hardware-disabled."""
        lvt0 = self._regs[APIC_LVT0]
        if not self.hw_enabled():
            return True
        return not lvt0 & APIC_LVT_MASKED and lvt0 & APIC_MODE_MASK == APIC_DM_EXTINT

    def _has_extint(self) -> bool:
        """kvm_cpu_has_extint: the PIC's output, where this vCPU takes it."""
        return self.accepts_pic_interrupt() and self.irqchip.pic.output

    def has_interrupt(self) -> bool:
        """kvm_cpu_has_injectable_intr."""
        with self.irqchip.locked():
            return self._has_extint() or self._apic_interrupt() != -1

    def acknowledge(self) -> int:
        """kvm_cpu_get_interrupt: the PIC's vector (kvm_pic_read_irq) where ExtINT is pending, else
        the LAPIC's highest deliverable IRR vector moved to ISR (kvm_get_apic_interrupt)."""
        with self.irqchip.locked():
            if self._has_extint():
                return self.irqchip.pic.read_irq()
            vector = self._apic_interrupt()
            if vector < 0:
                # has_interrupt said yes and something took it away meanwhile (the guest raised TPR
                # from another vCPU...): the spurious vector, as a real APIC delivers then.
                return self._regs[APIC_SPIV] & 0xFF
            self.irr &= ~(1 << vector)
            self.isr |= 1 << vector
            self._update_ppr()
            return vector

    def _set_eoi(self) -> None:
        """apic_set_eoi: clear the highest ISR bit; a level-triggered vector's EOI goes to the IOAPIC."""
        vector = _highest(self.isr)
        if vector < 0:
            return
        self.isr &= ~(1 << vector)
        self._update_ppr()
        self.irqchip.eoi_to_ioapic(self, vector, bool(self.tmr & (1 << vector)))
        if self._apic_interrupt() != -1:
            self.kick()  # KVM_REQ_EVENT: a lower vector may be deliverable now

    # --- registers (kvm_lapic_reg_read / kvm_lapic_reg_write) ------------------------------------------

    def _read_reg(self, offset: int) -> int:
        """__apic_read (offset 16-byte aligned)."""
        if APIC_ISR <= offset < APIC_ISR + 0x80:
            return (self.isr >> ((offset - APIC_ISR) // 0x10 * 32)) & U32
        if APIC_TMR <= offset < APIC_TMR + 0x80:
            return (self.tmr >> ((offset - APIC_TMR) // 0x10 * 32)) & U32
        if APIC_IRR <= offset < APIC_IRR + 0x80:
            return (self.irr >> ((offset - APIC_IRR) // 0x10 * 32)) & U32
        if offset == APIC_ARBPRI:
            return 0  # "Access to APIC_ARBPRI is not supported": reads 0
        if offset == APIC_TMCCT:
            return self._tmcct()
        if offset == APIC_PROCPRI:
            return self._update_ppr()
        return self._regs.get(offset, 0)

    def _readable(self, offset: int) -> bool:
        return offset in _READABLE or (not self.x2apic_mode() and offset in _READABLE_XAPIC_ONLY)

    def _write_reg(self, reg: int, val: int) -> bool:
        """kvm_lapic_reg_write; False where KVM returns 1 (an x2APIC MSR write then takes #GP)."""
        val &= U32
        x2apic = self.x2apic_mode()
        if reg == APIC_ID:
            if x2apic:
                return False
            self._regs[APIC_ID] = val & 0xFF000000  # kvm_apic_set_xapic_id(val >> 24)
        elif reg == APIC_TASKPRI:
            self._regs[APIC_TASKPRI] = val & 0xFF
            self._update_ppr()
            if self._apic_interrupt() != -1:
                self.kick()
        elif reg == APIC_EOI:
            self._set_eoi()
        elif reg == APIC_LDR:
            if x2apic:
                return False
            self._regs[APIC_LDR] = val & APIC_LDR_MASK
        elif reg == APIC_DFR:
            if x2apic:
                return False
            self._regs[APIC_DFR] = val | 0x0FFFFFFF
        elif reg == APIC_SPIV:
            self._regs[APIC_SPIV] = val & 0x3FF
            if not val & APIC_SPIV_APIC_ENABLED:
                for lvt in LVT_REGISTERS:
                    self._regs[lvt] |= APIC_LVT_MASKED
                self._update_lvtt()
        elif reg == APIC_ICR:
            if x2apic:
                return False
            val &= ~APIC_ICR_BUSY
            self._send_ipi(val, self._regs[APIC_ICR2])
            self._regs[APIC_ICR] = val
        elif reg == APIC_ICR2:
            if x2apic:
                return False
            self._regs[APIC_ICR2] = val & 0xFF000000
        elif reg in APIC_LVT_WRITE_MASKS and reg != APIC_LVTT:
            if not self.sw_enabled():
                val |= APIC_LVT_MASKED
            self._regs[reg] = val & APIC_LVT_WRITE_MASKS[reg]
            if reg == APIC_LVT0 and self._has_extint():
                self.kick()
        elif reg == APIC_LVTT:
            if not self.sw_enabled():
                val |= APIC_LVT_MASKED
            self._regs[APIC_LVTT] = val & (APIC_LVT_WRITE_MASKS[APIC_LVTT] | self.timer_mode_mask)
            self._update_lvtt()
        elif reg == APIC_TMICT:
            if self.timer_mode == APIC_LVT_TIMER_TSCDEADLINE:
                return True
            self._cancel_timer()
            self._regs[APIC_TMICT] = val
            self._start_timer()
        elif reg == APIC_TDCR:
            old = self.divide_count
            self._regs[APIC_TDCR] = val & 0xB
            self._update_divide_count()
            if self.divide_count != old and self.period_ns:
                self._rescale_timer(old)
        elif reg == APIC_ESR:
            if x2apic and val != 0:
                return False
        elif reg == APIC_SELF_IPI:
            if not x2apic:
                return False
            self._send_ipi(APIC_DEST_SELF | (val & APIC_VECTOR_MASK), 0)
        else:
            return False
        return True

    def _send_ipi(self, icr_low: int, icr_high: int) -> None:
        """kvm_apic_send_ipi."""
        irq = LapicIrq(
            vector=icr_low & APIC_VECTOR_MASK,
            delivery_mode=icr_low & APIC_MODE_MASK,
            logical=bool(icr_low & APIC_DEST_LOGICAL),
            level=bool(icr_low & APIC_INT_ASSERT),
            level_triggered=bool(icr_low & APIC_INT_LEVELTRIG),
            shorthand=icr_low & APIC_SHORT_MASK,
            dest_id=icr_high if self.x2apic_mode() else icr_high >> 24,
        )
        self.irqchip.deliver_to_apic(self, irq)

    # --- KVM_GET_LAPIC / KVM_SET_LAPIC --------------------------------------------------------------

    def get_state(self) -> bytes:
        """kvm_apic_get_state: the 1 KiB register page (xAPIC layout), TMCCT as it reads now."""
        with self.irqchip.locked():
            page = bytearray(KVM_APIC_REG_SIZE)
            offsets = set(self._regs) | set(_READABLE) | {APIC_ARBPRI}
            for offset in sorted(offsets):
                if offset + 4 <= KVM_APIC_REG_SIZE:
                    value = self._read_reg(offset)
                    page[offset : offset + 4] = (value & U32).to_bytes(4, "little")
            return bytes(page)

    def set_state(self, page: bytes) -> None:
        """kvm_apic_set_state: take the register page, recompute PPR, the timer mode and divisor,
        restart the timer from the page's TMCCT (__start_apic_timer(apic, APIC_TMCCT))."""
        if len(page) != KVM_APIC_REG_SIZE:
            raise ValueError(f"a LAPIC register page is {KVM_APIC_REG_SIZE} bytes, not {len(page)}")

        def reg(offset: int) -> int:
            return int.from_bytes(page[offset : offset + 4], "little")

        with self.irqchip.locked():
            self._cancel_timer()
            for offset in list(self._regs):
                if offset not in (APIC_LVR, APIC_PROCPRI):
                    self._regs[offset] = reg(offset)
            self._regs[APIC_SPIV] = reg(APIC_SPIV) & 0x3FF
            self.irr = sum(reg(APIC_IRR + 0x10 * i) << (32 * i) for i in range(8))
            self.isr = sum(reg(APIC_ISR + 0x10 * i) << (32 * i) for i in range(8))
            self.tmr = sum(reg(APIC_TMR + 0x10 * i) << (32 * i) for i in range(8))
            self._update_ppr()
            self._update_lvtt()
            self._update_divide_count()
            self.tscdeadline = 0
            if self.timer_mode != APIC_LVT_TIMER_TSCDEADLINE and self._regs[APIC_TMICT]:
                now = self._tsc().now_ns()
                self.period_ns = self._regs[APIC_TMICT] * APIC_BUS_CYCLE_NS * self.divide_count
                self._limit_periodic()
                first = reg(APIC_TMCCT) * APIC_BUS_CYCLE_NS * self.divide_count
                if first <= 0 or first > self.period_ns:
                    first = self.period_ns if self.timer_mode == APIC_LVT_TIMER_PERIODIC else max(first, 0)
                    first = min(first, self.period_ns)
                self.target_ns = now + first
                self.timer.start(self.target_ns)
            if self._has_extint() or self._apic_interrupt() != -1:
                self.kick()  # KVM_REQ_EVENT

    # --- the xAPIC page (IoDevice: apic_mmio_read / apic_mmio_write) -----------------------------------

    def _in_range(self, addr: int) -> bool:
        return self.base_address <= addr < self.base_address + APIC_PAGE_SIZE

    def read(self, addr: int, length: int) -> bytes | None:
        if not self._in_range(addr):
            return None
        with self.irqchip.locked():
            if not self.hw_enabled() or self.x2apic_mode():
                return b"\xff" * length
            offset = addr - self.base_address
            alignment = offset & 0xF
            if alignment + length > 4 or not self._readable(offset & ~0xF):
                return bytes(length)  # kvm_lapic_reg_read fails; the emulator's buffer stays zero
            value = self._read_reg(offset & ~0xF)
            return (value >> (8 * alignment) & ((1 << (8 * length)) - 1)).to_bytes(length, "little")

    def write(self, addr: int, data: bytes) -> bool:
        if not self._in_range(addr):
            return False
        with self.irqchip.locked():
            if not self.hw_enabled() or self.x2apic_mode():
                return True
            offset = addr - self.base_address
            # "APIC register must be aligned on 128-bits boundary. 32/64/128 bits registers must be
            # accessed thru 32 bits" (SDM 10.4.1): anything else is dropped.
            if len(data) != 4 or offset & 0xF:
                return True
            self._write_reg(offset & 0xFF0, int.from_bytes(data, "little"))
            return True

    # --- MSRs ---------------------------------------------------------------------------------------

    def register_msrs(self, msrs: MsrTable) -> None:
        # The vCPU keeps IA32_APIC_BASE while it has no LAPIC (cpu_msrs.py, as KVM keeps
        # vcpu->arch.apic_base); with one, kvm_set_apic_base goes to kvm_lapic_set_base: this takes over.
        msrs.register(
            MSR_IA32_APICBASE,
            read=self._read_apic_base,
            write=self._write_apic_base,
            owner="lapic",
            replace=True,
        )
        msrs.register(
            MSR_IA32_TSC_DEADLINE, read=self._read_tsc_deadline, write=self._write_tsc_deadline, owner="lapic"
        )
        msrs.register(
            APIC_BASE_MSR, X2APIC_MSR_LAST, read=self._read_x2apic, write=self._write_x2apic, owner="lapic"
        )

    def _read_apic_base(self, index: int, host: bool) -> int:
        return self.apic_base

    def _write_apic_base(self, index: int, value: int, host: bool) -> None:
        """kvm_set_apic_base -> kvm_lapic_set_base; reserved: kvm_vcpu_reserved_gpa_bits_raw, 0x2ff,
        and X2APIC_ENABLE unless the guest's CPUID has x2APIC."""
        reserved = (
            ((1 << 64) - (1 << self.maxphyaddr)) | 0x2FF | (0 if self.x2apic_allowed else X2APIC_ENABLE)
        )
        new_x2, new_en = bool(value & X2APIC_ENABLE), bool(value & MSR_IA32_APICBASE_ENABLE)
        if value & reserved or (new_x2 and not new_en):
            raise MsrFault(f"IA32_APIC_BASE {value:#x}: reserved bits, or x2APIC without enable")
        with self.irqchip.locked():
            if not host:
                if self.x2apic_mode() and new_en and not new_x2:
                    raise MsrFault("IA32_APIC_BASE: x2APIC -> xAPIC without disabling first")
                if not self.hw_enabled() and new_x2:
                    raise MsrFault("IA32_APIC_BASE: disabled -> x2APIC")
            old = self.apic_base
            self.apic_base = value
            if (old ^ value) & MSR_IA32_APICBASE_ENABLE and value & MSR_IA32_APICBASE_ENABLE:
                self._regs[APIC_ID] = (self.vcpu_id & 0xFF) << 24  # kvm_apic_set_xapic_id
            if (old ^ value) & X2APIC_ENABLE and value & X2APIC_ENABLE:
                # kvm_apic_set_x2apic_id: the full id, and the LDR derived from it
                self._regs[APIC_ID] = self.vcpu_id
                self._regs[APIC_LDR] = ((self.vcpu_id >> 4) << 16) | (1 << (self.vcpu_id & 0xF))
            self.base_address = value & MSR_IA32_APICBASE_BASE

    def _read_tsc_deadline(self, index: int, host: bool) -> int:
        """kvm_get_lapic_tscdeadline_msr: 0 unless the timer is in TSC-deadline mode."""
        with self.irqchip.locked():
            if not self.present() or self.timer_mode != APIC_LVT_TIMER_TSCDEADLINE:
                return 0
            return self.tscdeadline

    def _write_tsc_deadline(self, index: int, value: int, host: bool) -> None:
        """kvm_set_lapic_tscdeadline_msr: ignored outside TSC-deadline mode; 0 disarms."""
        with self.irqchip.locked():
            if not self.present() or self.timer_mode != APIC_LVT_TIMER_TSCDEADLINE:
                return
            self._cancel_timer()
            self.tscdeadline = value
            self._start_timer()

    def _read_x2apic(self, index: int, host: bool) -> int:
        """kvm_x2apic_msr_read: #GP outside x2APIC mode, for a write-only or reserved register."""
        reg = (index - APIC_BASE_MSR) << 4
        with self.irqchip.locked():
            if not self.x2apic_mode():
                raise MsrFault(f"x2APIC MSR {index:#x} outside x2APIC mode")
            if reg == APIC_ICR:
                return self._regs[APIC_ICR2] << 32 | self._regs[APIC_ICR]
            if not self._readable(reg):
                raise MsrFault(f"x2APIC MSR {index:#x} is not readable")
            return self._read_reg(reg)

    def _write_x2apic(self, index: int, value: int, host: bool) -> None:
        """kvm_x2apic_msr_write: ICR is one 64-bit register; others take 32 bits."""
        reg = (index - APIC_BASE_MSR) << 4
        with self.irqchip.locked():
            if not self.x2apic_mode():
                raise MsrFault(f"x2APIC MSR {index:#x} outside x2APIC mode")
            if reg == APIC_ICR:
                low, high = value & U32, value >> 32
                low &= ~APIC_ICR_BUSY
                self._send_ipi(low, high)
                self._regs[APIC_ICR], self._regs[APIC_ICR2] = low, high
                return
            if value >> 32 or not self._write_reg(reg, value):
                raise MsrFault(f"x2APIC MSR {index:#x}: write {value:#x} refused")

    # --- the timer ----------------------------------------------------------------------------------

    def _tsc(self) -> TscClock:
        return self.vcpu.tsc

    def _update_divide_count(self) -> None:
        """update_divide_count: TDCR bits 0, 1, 3 -> divide by 2, 4, ... 128, 1."""
        tdcr = self._regs[APIC_TDCR] & 0xF
        shift = ((tdcr & 0x3) | ((tdcr & 0x8) >> 1)) + 1
        self.divide_count = 1 << (shift & 0x7)

    def _update_lvtt(self) -> None:
        """apic_update_lvtt: a change into or out of TSC-deadline mode stops the timer."""
        mode = self._regs[APIC_LVTT] & TIMER_MODE_MASK
        if mode != self.timer_mode:
            if (self.timer_mode == APIC_LVT_TIMER_TSCDEADLINE) != (mode == APIC_LVT_TIMER_TSCDEADLINE):
                self._cancel_timer()
                self._regs[APIC_TMICT] = 0
                self.period_ns = 0
                self.tscdeadline = 0
            self.timer_mode = mode
            self._limit_periodic()

    def _limit_periodic(self) -> None:
        """limit_periodic_timer_frequency: no periodic timer faster than min_timer_period_us."""
        if self.timer_mode == APIC_LVT_TIMER_PERIODIC and 0 < self.period_ns < MIN_TIMER_PERIOD_NS:
            self.period_ns = MIN_TIMER_PERIOD_NS

    def _cancel_timer(self) -> None:
        self.timer.cancel()

    def _start_timer(self) -> None:
        """start_apic_timer: set_target_expiration + restart_apic_timer (start_sw_timer)."""
        now = self._tsc().now_ns()
        if self.timer_mode == APIC_LVT_TIMER_TSCDEADLINE:
            # start_sw_tscdeadline: a deadline already reached fires at once
            if not self.tscdeadline:
                return
            expire = self._tsc().host_ns_at(self.tscdeadline)
            self.target_ns = expire
            if expire <= now:
                self._expire()
            else:
                self.timer.start(expire)
            return
        self.period_ns = self._regs[APIC_TMICT] * APIC_BUS_CYCLE_NS * self.divide_count
        if not self.period_ns:
            self.target_ns = 0
            return
        self._limit_periodic()
        self.target_ns = now + self.period_ns
        self.timer.start(self.target_ns)

    def _rescale_timer(self, old_divisor: int) -> None:
        """update_target_expiration + restart_apic_timer: the rest of the count at the new divisor."""
        self.timer.cancel()
        now = self._tsc().now_ns()
        remaining = max(0, self.target_ns - now)
        self.period_ns = self._regs[APIC_TMICT] * APIC_BUS_CYCLE_NS * self.divide_count
        self._limit_periodic()
        self.target_ns = now + remaining * self.divide_count // old_divisor
        self.timer.start(self.target_ns)

    def _tmcct(self) -> int:
        """apic_get_tmcct: what is left of the count (0 once a one-shot expired, or no timer)."""
        if self.period_ns == 0 or self.timer_mode == APIC_LVT_TIMER_TSCDEADLINE:
            return 0
        remaining = self.target_ns - self._tsc().now_ns()
        if remaining < 0:
            remaining = 0
        return (remaining % self.period_ns) // (APIC_BUS_CYCLE_NS * self.divide_count)

    def _expire(self) -> None:
        """apic_timer_expired + kvm_apic_inject_pending_timer_irqs (the lock held)."""
        self.local_deliver(APIC_LVTT)
        if self.timer_mode == APIC_LVT_TIMER_TSCDEADLINE:
            self.tscdeadline = 0
        elif self.timer_mode == APIC_LVT_TIMER_ONESHOT:
            self.target_ns = 0

    def _timer_expired(self) -> int | None:
        """apic_timer_fn (the host timer's thread): deliver; a periodic timer restarts one period on."""
        with self.irqchip.locked():
            if self.irqchip.closed:
                return None
            self._expire()
            if self.timer_mode == APIC_LVT_TIMER_PERIODIC and self.period_ns:
                # advance_periodic_target_expiration: from the last target, not from now
                self.target_ns += self.period_ns
                return self.target_ns
            return None
