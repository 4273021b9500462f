"""_OSC for a PCI Express host bridge: which native PCIe features the OS may control.

Linux evaluates _OSC on every PCI root bridge (negotiate_os_control() in drivers/acpi/pci_root.c):
first a query of what the platform grants, then a request for exactly that. Without _OSC it logs
"_OSC: platform retains control of PCIe features (AE_NOT_FOUND)" and leaves hot-plug, AER and PME
of the Root and Downstream Ports to the firmware, which pcihole does not have. This is QEMU's
method (build_q35_osc_method() in hw/i386/acpi-build.c, since renamed
build_pci_host_bridge_osc_method()), in ASL::

    Method (_OSC, 4, NotSerialized) {
        CreateDWordField (Arg3, Zero, CDW1)
        If ((Arg0 == ToUUID ("33db4d5b-1ff7-401c-9657-7441c03dd766"))) {   // PCI Host Bridge
            CreateDWordField (Arg3, 0x04, CDW2)                            // Support Field
            CreateDWordField (Arg3, 0x08, CDW3)                            // Control Field
            Local0 = CDW3
            Local0 &= 0x1D                      // what the platform grants (below)
            If ((Arg1 != One)) { CDW1 |= 0x08 } // unknown revision
            If ((CDW3 != Local0)) { CDW1 |= 0x10 }  // capabilities were masked
            CDW3 = Local0
        } Else {
            CDW1 |= 0x04                        // unrecognized UUID
        }
        Return (Arg3)
    }

The Control Field bits are the PCI Firmware Specification 3.3's (§4.5.1, Table 4-5), and granted
as QEMU grants them:

- native PCIe hot-plug (bit 0) where the host bridge has hot-pluggable slots below it (every root
  and downstream port of pcihole is one: pcie_capability.py); QEMU grants it to its pxb-pcie
  bridges always and to PCI0 unless ACPI PCI hot-plug is on, which pcihole has not;
- PME (bit 2), AER (bit 3) and the PCIe Capability Structure (bit 4): always ("Always allow native
  PME, AER (no dependencies)");
- not SHPC (bit 1): QEMU grants it because its pci-bridge has an SHPC controller by default;
  pcihole's pci-bridge is QEMU's with shpc=off (pci/pci_bridge.py), so nothing could use it;
- nor LTR (bit 5) and the later bits, which QEMU masks too: Linux says "_OSC: platform does not
  support [LTR]", as it does on QEMU.
"""

from __future__ import annotations

from . import aml

OSC = "_OSC"
#: PCI Firmware Specification 3.3 §4.5.1: "the UUID for PCI Host Bridge Device".
PCI_HOST_BRIDGE_UUID = "33DB4D5B-1FF7-401C-9657-7441C03DD766"
OSC_REVISION = 1
# Capabilities Buffer DWORD 1 (status), ACPI 6.5 §6.2.11 "_OSC (Operating System Capabilities)".
OSC_UNRECOGNIZED_UUID = 1 << 2
OSC_UNRECOGNIZED_REVISION = 1 << 3
OSC_CAPABILITIES_MASKED = 1 << 4
# Control Field (DWORD 3) bits, PCI Firmware Specification 3.3 Table 4-5.
OSC_PCIE_NATIVE_HOTPLUG = 1 << 0
OSC_SHPC_NATIVE_HOTPLUG = 1 << 1
OSC_PCIE_PME = 1 << 2
OSC_PCIE_AER = 1 << 3
OSC_PCIE_CAPABILITY = 1 << 4
OSC_LTR = 1 << 5
ALWAYS_GRANTED = OSC_PCIE_PME | OSC_PCIE_AER | OSC_PCIE_CAPABILITY
# Where each DWORD of the capabilities buffer (Arg3) is.
CDW1, CDW2, CDW3 = "CDW1", "CDW2", "CDW3"


def granted_controls(native_hotplug: bool) -> int:
    """The Control Field bits a host bridge grants (see the module docstring)."""
    return ALWAYS_GRANTED | (OSC_PCIE_NATIVE_HOTPLUG if native_hotplug else 0)


def osc_method(native_hotplug: bool) -> bytes:
    """The _OSC method of a PCIe host bridge; `native_hotplug`: it has hot-pluggable slots below it."""
    cdw1, cdw3, ctrl = aml.name_string(CDW1), aml.name_string(CDW3), aml.local(0)
    capabilities = aml.arg(3)
    host_bridge = [
        aml.create_dword_field(capabilities, aml.integer(4), CDW2),
        aml.create_dword_field(capabilities, aml.integer(8), CDW3),
        aml.store(cdw3, ctrl),
        aml.and_(ctrl, aml.integer(granted_controls(native_hotplug)), ctrl),
        aml.if_(
            aml.lnot(aml.lequal(aml.arg(1), aml.integer(OSC_REVISION))),
            [aml.or_(cdw1, aml.integer(OSC_UNRECOGNIZED_REVISION), cdw1)],
        ),
        aml.if_(
            aml.lnot(aml.lequal(cdw3, ctrl)),
            [aml.or_(cdw1, aml.integer(OSC_CAPABILITIES_MASKED), cdw1)],
        ),
        aml.store(ctrl, cdw3),
    ]
    return aml.method(
        OSC,
        4,
        [
            aml.create_dword_field(capabilities, aml.integer(0), CDW1),
            aml.if_(aml.lequal(aml.arg(0), aml.to_uuid(PCI_HOST_BRIDGE_UUID)), host_bridge),
            aml.else_([aml.or_(cdw1, aml.integer(OSC_UNRECOGNIZED_UUID), cdw1)]),
            aml.return_(capabilities),
        ],
    )
