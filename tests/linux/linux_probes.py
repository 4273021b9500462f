"""Which absent functions' config space Linux 6.1's PCI core reads while it enumerates a machine, and
how: the prediction a boot with the `exit` strategy is checked against, access by access.

Read from the kernel source (Linux 6.1, drivers/pci/probe.c and arch/x86/pci/; the same code is in
Debian 12's 6.1.0 cloud kernel), up to the end of the PCI core's work (`PCI: CLS`, printed by
pci_apply_final_quirks() as an fs_initcall_sync; the port drivers, pciehp among them, bind later):

- **Root buses.** acpi_pci_root_add() -> pci_acpi_scan_root() -> pci_scan_child_bus() for each
  PNP0A08 host bridge (each segment's main root bus, and each expander's bus). pci_scan_child_bus_extend()
  calls pci_scan_slot() for devfn 0, 8, ..., 248, then pci_scan_bridge_extend() for each bridge it
  found (pass 0 keeps the bus numbers firmware gave: pcibios_assign_all_busses() is false on x86) and
  so scans every bridge's secondary bus the same way.
- **A slot.** pci_scan_slot() -> pci_scan_single_device() -> pci_scan_device() ->
  pci_bus_read_dev_vendor_id() -> pci_bus_generic_read_dev_vendor_id(): one 32-bit read at offset 0.
  All-ones (what pcihole's holes read), 0, 0x0000ffff and 0xffff0000 mean absent, and no CRS retry
  follows (that needs the value 0x0001). An absent function 0 ends the slot
  (hypervisor_isolated_pci_functions() is true only on s390 and Jailhouse). next_fn(): after a
  present function 0 without the multi-function bit, -ENODEV; after one with it, functions 1 to 7
  are each read once, present or not (next_fn() goes on when `dev` is NULL). ARI (next_ari_fn()) needs
  an ARI capability, which no pcihole function has. A function already known (pci_get_slot()) is not
  read again. pci_bus_read_dev_vendor_id()'s only quirk is for IDT 0x80b5 switches.
- **Below a PCIe port.** only_one_child(): below a Root Port, a Downstream Port or a PCI/PCI-X-to-PCIe
  bridge (pcie_downstream_port()) only device 0 is scanned (pci_scan_slot() returns at once for
  devfn > 0), unless pci=pcie_scan_all. A switch's internal bus (below an upstream port) and a
  conventional PCI-PCI bridge's bus get all 32 slots.
- **Peer buses.** pci_subsys_init() (arch/x86/pci/legacy.c, after acpi_init) ->
  pcibios_fixup_peer_bridges(): when 0 < pcibios_last_bus <= 0xff, pcibios_scan_specific_bus() for
  every bus 0..pcibios_last_bus of domain 0 that pci_find_bus(0, n) does not know: 16-bit reads of
  the vendor ID at devfn 0, 8, ..., 248 (stride 1 only under Jailhouse) through raw_pci_read(), i.e.
  ECAM here. pcibios_last_bus is set in __pci_mmcfg_init() (arch/x86/pci/mmconfig-shared.c) from the
  MCFG list, sorted by segment and start bus: the end bus of the last segment-0 entry (the loop
  breaks at the first entry of another segment, so with no segment 0 it stays -1). The known buses are
  the root buses and every bridge's secondary bus (pci_add_new_bus()), not the rest of a bridge's
  [secondary, subordinate] range.
- **Nothing else** reads an absent function's config space before `PCI: CLS`: the MCFG checks
  (pci_mmcfg_check_reserved(), is_acpi_reserved()) read ACPI, not ECAM; the early conf1 pokes
  (early_quirks(), pci_direct_probe()) are port I/O; pcibios_fixup_bus(), the header quirks,
  capabilities, ASPM, MPS and the resource assignment read present functions (their bus's bridge or
  the function itself).
"""

from __future__ import annotations

from collections import Counter

from pcihole.pci.bdf import Bdf
from pcihole.pci.topology import DownstreamPortSpec, RootPortSpec, Topology

#: pcibios_scan_specific_bus() and pci_scan_child_bus_extend() step through devfn 8 at a time.
SLOTS = 32
FUNCTIONS = 8
VENDOR_ID = 0  # PCI_VENDOR_ID
ROOT_SCAN_READ = 4  # pci_bus_read_config_dword(bus, devfn, PCI_VENDOR_ID, l)
PEER_SCAN_READ = 2  # raw_pci_read(0, busn, devfn, PCI_VENDOR_ID, 2, &l)
MAX_LAST_BUS = 0xFF

#: One config access: (guest-physical address, size in bytes, "read" | "write"), as RunStats counts them.
Access = tuple[int, int, str]


def _only_one_child(topology: Topology, segment: int, bus: int) -> bool:
    """only_one_child(): the bus's bridge is a PCIe Root Port or Downstream Port (pcihole has no
    PCI-to-PCIe bridge, the third kind pcie_downstream_port() names)."""
    bridge = topology.parent_bridge(segment, bus)
    return isinstance(bridge, (RootPortSpec, DownstreamPortSpec))


def _present(topology: Topology) -> set[Bdf]:
    return {f.bdf for f in topology.functions()}


def _scan_bus(
    topology: Topology, segment: int, bus: int, present: set[Bdf], probes: Counter[Access], known: set[int]
) -> None:
    """pci_scan_child_bus_extend(): the slots of `bus`, then the secondary bus of each bridge on it."""
    known.add(bus)
    page = topology.segment(segment).page_gpa
    slots = 1 if _only_one_child(topology, segment, bus) else SLOTS
    for slot in range(slots):
        function0 = Bdf(segment, bus, slot, 0)
        if function0 not in present:
            probes[(page(function0), ROOT_SCAN_READ, "read")] += 1
            continue
        if not topology.is_multifunction(function0):
            continue
        for fn in range(1, FUNCTIONS):
            bdf = Bdf(segment, bus, slot, fn)
            if bdf not in present:
                probes[(page(bdf), ROOT_SCAN_READ, "read")] += 1
    bridges = sorted(
        (b for b in topology.all_bridges() if b.bdf.segment == segment and b.bdf.bus == bus),
        key=lambda b: b.bdf,
    )
    for bridge in bridges:
        _scan_bus(topology, segment, bridge.secondary, present, probes, known)


def pcibios_last_bus(topology: Topology) -> int:
    """__pci_mmcfg_init(): the end bus of the last segment-0 MCFG entry; -1 without one."""
    last = -1
    for segment in sorted(topology.segments, key=lambda s: (s.id, s.start_bus)):
        if segment.id != 0:
            break
        last = segment.end_bus
    return last


def predicted_absent_probes(topology: Topology) -> Counter[Access]:
    """Every config access Linux 6.1 makes at an absent function until its PCI core is done, by
    address, size and kind, with how many times it makes it (see the module's docstring)."""
    present = _present(topology)
    probes: Counter[Access] = Counter()
    known: dict[int, set[int]] = {s.id: set() for s in topology.segments}
    for segment in topology.segments:  # each PNP0A08 host bridge's root bus
        _scan_bus(topology, segment.id, segment.root_bus, present, probes, known[segment.id])
    for expander in topology.expanders:
        _scan_bus(topology, expander.bdf.segment, expander.bus, present, probes, known[expander.bdf.segment])
    last_bus = pcibios_last_bus(topology)
    if 0 < last_bus <= MAX_LAST_BUS:  # pcibios_fixup_peer_bridges()
        segment0 = topology.segment(0)
        for bus in range(last_bus + 1):
            if bus in known[0]:
                continue
            for slot in range(SLOTS):
                bdf = Bdf(0, bus, slot, 0)
                # Every peer bus here is empty: a bus with a device would have been reached by a
                # bridge (Topology.validate()), so the whole bus is probed and none is "discovered".
                assert bdf not in present, bdf
                if segment0.has_bus(bus):  # pci_dev_base() is NULL outside every region: no access
                    probes[(segment0.page_gpa(bdf) + VENDOR_ID, PEER_SCAN_READ, "read")] += 1
    return probes
