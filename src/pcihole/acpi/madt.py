"""The MADT (signature "APIC"): the x86 interrupt controllers a guest should expect (ACPI 6.5 §5.2.12).

    header (36) | Local Interrupt Controller Address u32 = 0xFEE00000 | Flags u32 = 0 |
    one Processor Local APIC structure per vCPU (type 0, 8 bytes, §5.2.12.2) |
    one I/O APIC structure (type 1, 12 bytes, §5.2.12.3): id, address 0xFEC00000, GSI base 0

Why these entries:

- It is what every x86 VMM gives a direct-booted Linux (Firecracker emits exactly LAPICs + one IOAPIC;
  cloud-hypervisor and QEMU microvm add ISOs and NMI entries), and it describes KVM's in-kernel LAPIC
  (0xFEE00000) and IOAPIC (0xFEC00000, api.rst KVM_CREATE_IRQCHIP), which the kvm backend creates.
- Linux enumerates CPUs from it (acpi_parse_madt_lapic_entries -> acpi_register_lapic). Without a MADT
  it falls back to an MP-table scan of the BIOS areas (CONFIG_X86_MPPARSE), finds none, and runs
  with "APIC: ACPI MADT or MP tables are not detected" (apic_intr_mode_select), a path no VMM tests.
- Both backends have that irqchip (the model's in hv/model/irqchip.py). On a backend without one the
  IOAPIC's registers would read all-ones (unclaimed MMIO, machine/dispatch.py):
  mp_register_ioapic() -> bad_ioapic_register() prints "I/O APIC 0xfec00000 registers return all
  ones, skipping!" and Linux carries on without it.

Interrupt Source Overrides (type 2, §5.2.12.5), as QEMU's build_madt() (hw/i386/acpi-common.c) gives
them with KVM's in-kernel irqchip: ISA IRQ 0 (the PIT, KVM_CREATE_PIT2) arrives on GSI 2 of the IOAPIC,
flags 0 (conforms to the bus: edge, active high); IRQ 9 (the SCI on a PC) level-triggered, active
high (flags 0x000d). Without the override Linux would route the timer to IOAPIC pin 0.
The override is true because the machine makes it so: KVM's default routing sends the PIT's GSI 0 to
IOAPIC pin 0 (measured, tests/model/test_differential_ioapic.py), so machine/builder.py installs
QEMU's PC routing right after KVM_CREATE_IRQCHIP (machine/irq_routing.py: kvm_pc_setup_irq_routing,
KVM_SET_GSI_ROUTING; GSI 0 -> IOAPIC pin 2) on every backend that has KVM_CAP_IRQ_ROUTING
(tests/model/test_differential_irq_routing.py).

Flags = 0: PCAT_COMPAT (bit 0) clear, as Firecracker leaves it: the FADT is hardware-reduced, so
Linux uses null_legacy_pic and never drives the in-kernel 8259s, which stay unused behind LINT0. Processor UID = APIC ID = vCPU index, KVM's default
APIC ID for vCPU n (the id passed to KVM_CREATE_VCPU). The I/O APIC takes the first id after the CPUs.
Only xAPIC entries (type 0, 8-bit ids) are made, so at most 254 vCPUs (0xFF is the broadcast id).
"""

from __future__ import annotations

import struct

from .sdt_header import build_sdt

MADT_SIGNATURE = b"APIC"
MADT_REVISION = 6  # ACPI 6.5 (edk2's EFI_ACPI_6_5_MULTIPLE_APIC_DESCRIPTION_TABLE_REVISION)
LOCAL_APIC_ADDRESS = 0xFEE00000  # APIC_DEFAULT_PHYS_BASE
IO_APIC_ADDRESS = 0xFEC00000  # IO_APIC_DEFAULT_PHYS_BASE, KVM's in-kernel IOAPIC
IO_APIC_GSI_BASE = 0
MADT_FLAGS = 0  # no PCAT_COMPAT: no 8259 PICs
PCAT_COMPAT = 1 << 0

MADT_HEADER = struct.Struct("<II")  # Local Interrupt Controller Address, Flags (offsets 36, 40)
TYPE_LOCAL_APIC = 0
TYPE_IO_APIC = 1
TYPE_INTERRUPT_OVERRIDE = 2
INTERRUPT_OVERRIDE = struct.Struct("<BBBBIH")  # type, length 10, bus (0 = ISA), source IRQ, GSI, flags
ISA_BUS = 0
MPS_INTI_POLARITY_HIGH = 0x1
MPS_INTI_TRIGGER_LEVEL = 0xC
#: (ISA IRQ, GSI, MPS INTI flags), QEMU's build_madt() with kvm's irqchip.
INTERRUPT_OVERRIDES = ((0, 2, 0), (9, 9, MPS_INTI_POLARITY_HIGH | MPS_INTI_TRIGGER_LEVEL))
LOCAL_APIC = struct.Struct("<BBBBI")  # type, length 8, ACPI Processor UID, APIC ID, flags
IO_APIC = struct.Struct("<BBBBII")  # type, length 12, I/O APIC ID, reserved, address, GSI base
LOCAL_APIC_ENABLED = 1 << 0  # §5.2.12.2 Local APIC Flags: "Enabled"
MAX_XAPIC_CPUS = 254


def build_madt(cpus: int) -> bytes:
    if not 1 <= cpus <= MAX_XAPIC_CPUS:
        raise ValueError(f"{cpus} vCPUs: the MADT's xAPIC entries describe 1 to {MAX_XAPIC_CPUS}")
    body = bytearray(MADT_HEADER.pack(LOCAL_APIC_ADDRESS, MADT_FLAGS))
    for cpu in range(cpus):
        body += LOCAL_APIC.pack(TYPE_LOCAL_APIC, LOCAL_APIC.size, cpu, cpu, LOCAL_APIC_ENABLED)
    body += IO_APIC.pack(TYPE_IO_APIC, IO_APIC.size, cpus, 0, IO_APIC_ADDRESS, IO_APIC_GSI_BASE)
    for irq, gsi, flags in INTERRUPT_OVERRIDES:
        body += INTERRUPT_OVERRIDE.pack(
            TYPE_INTERRUPT_OVERRIDE, INTERRUPT_OVERRIDE.size, ISA_BUS, irq, gsi, flags
        )
    return build_sdt(MADT_SIGNATURE, MADT_REVISION, bytes(body))
