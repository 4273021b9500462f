"""PCI Express configuration space behind an ECAM window: functions, root ports, the host bridge, hot-plug.

Pure Python, no hypervisor: the machine layer hands ECAM accesses to `host_bridge.HostBridge` and asks
it which 4 KiB pages hold present functions (everything else in a segment's window is the hole).

    topology.py        segments and function specs (plain data) and their validation
    synthetic.py       generated topologies for tests and benchmarks
    bdf.py             "0000:00:01.0" addresses
    ecam.py            offset <-> (bus, device, function, register)
    access.py          how one MMIO access is cut into configuration requests
    config_space.py    4 KiB of bytes + write masks (RO / RW / RW1C)
    registers.py       register names from Linux's pci_regs.h
    capabilities.py    capability list placement and lookup
    pcie_capability.py the PCI Express capability (device/port type, link, slot)
    aer.py             Advanced Error Reporting and Unsupported Request logging
    function.py        what every function has; DeviceInfo for listings
    endpoint.py        type 0 functions: endpoints, the host bridge and expander bridge functions
    type1_header.py    what every bridge has: bus numbers, windows, secondary status
    pcie_port.py       PCIe ports: the PCIe capability, AER, the hot-plug slot
    root_port.py       root ports (QEMU pcie-root-port)
    switch_port.py     a switch's upstream and downstream ports (QEMU x3130 / xio3130)
    pci_bridge.py      conventional PCI-PCI bridges (QEMU pci-bridge)
    lspci_tree.py      the tree as lspci -t prints it
    bridge_windows.py  what each root bus's BARs need of its host bridge's windows (Linux's sizing)
    host_bridge.py     ECAM routing, the hole's read/write policy, hot-plug and page listeners
"""
