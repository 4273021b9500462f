"""Configuration-space register offsets and bits, named as in Linux's include/uapi/linux/pci_regs.h.

Declared once here; every other module in `pcihole.pci` uses these names, never a bare offset.
Section numbers refer to the PCI Express Base Specification 6.0 ("PCIe 6.0"). Offsets inside a
capability (PCI_EXP_*, PCI_ERR_*) are relative to the capability's own start, as in pci_regs.h.
"""

from __future__ import annotations

# --- Sizes -------------------------------------------------------------------------------------------
PCI_CFG_SPACE_SIZE = 256  # the conventional PCI part, reachable with CF8/CFC
PCI_CFG_SPACE_EXP_SIZE = 4096  # a PCIe function's whole space, reachable only through ECAM (§7.2.2)

# --- Header common to both layouts (PCIe 6.0 §7.5.1.1) -------------------------------------------------
PCI_VENDOR_ID = 0x00  # u16
PCI_DEVICE_ID = 0x02  # u16
PCI_COMMAND = 0x04  # u16
PCI_STATUS = 0x06  # u16
PCI_CLASS_REVISION = 0x08  # u8 revision, then the 24-bit class code (prog-if, subclass, base class)
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C  # u8
PCI_LATENCY_TIMER = 0x0D  # u8; hardwired to 0 on PCIe (§7.5.1.1.8)
PCI_HEADER_TYPE = 0x0E  # u8
PCI_BIST = 0x0F  # u8
PCI_CAPABILITY_LIST = 0x34  # u8: offset of the first capability
PCI_INTERRUPT_LINE = 0x3C  # u8, read-write scratch for the OS
PCI_INTERRUPT_PIN = 0x3D  # u8, 1 = INTA#

PCI_HEADER_TYPE_NORMAL = 0  # type 0: an endpoint
PCI_HEADER_TYPE_BRIDGE = 1  # type 1: a PCI-PCI bridge, e.g. a root port
PCI_HEADER_TYPE_LAYOUT = 0x7F
PCI_HEADER_TYPE_MFD = 0x80  # multi-function device: Linux scans functions 1-7 only when fn 0 has it

# Command register (§7.5.1.1.3): the bits a PCIe function implements as read-write.
PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_PARITY = 0x0040
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_INTX_DISABLE = 0x0400
PCI_COMMAND_WRITABLE = (
    PCI_COMMAND_IO
    | PCI_COMMAND_MEMORY
    | PCI_COMMAND_MASTER
    | PCI_COMMAND_PARITY
    | PCI_COMMAND_SERR
    | PCI_COMMAND_INTX_DISABLE
)

# Status register (§7.5.1.1.4); the same bit positions are used by the bridge's Secondary Status.
PCI_STATUS_CAP_LIST = 0x0010  # read-only: a capability list exists
PCI_STATUS_PARITY = 0x0100  # Master Data Parity Error
PCI_STATUS_SIG_TARGET_ABORT = 0x0800
PCI_STATUS_REC_TARGET_ABORT = 0x1000
PCI_STATUS_REC_MASTER_ABORT = 0x2000  # "Received Master Abort": a UR completion came back
PCI_STATUS_SIG_SYSTEM_ERROR = 0x4000  # in Secondary Status: "Received System Error"
PCI_STATUS_DETECTED_PARITY = 0x8000
PCI_STATUS_ERROR_BITS = (  # all write-1-to-clear
    PCI_STATUS_PARITY
    | PCI_STATUS_SIG_TARGET_ABORT
    | PCI_STATUS_REC_TARGET_ABORT
    | PCI_STATUS_REC_MASTER_ABORT
    | PCI_STATUS_SIG_SYSTEM_ERROR
    | PCI_STATUS_DETECTED_PARITY
)

# --- Type 0 header (§7.5.1.2) ---------------------------------------------------------------------------
PCI_BASE_ADDRESS_0 = 0x10  # six u32 BARs, 0x10..0x27
PCI_NUM_BARS = 6
PCI_CARDBUS_CIS = 0x28
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30  # hardwired to 0 here: no expansion ROM
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F

# BAR low bits (§7.5.1.2.1): read-only flags under the address bits.
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_32 = 0x00
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_MEM_MASK = ~0x0F
PCI_BASE_ADDRESS_IO_MASK = ~0x03

# --- Type 1 header (§7.5.1.3) ---------------------------------------------------------------------------
PCI_PRIMARY_BUS = 0x18
PCI_SECONDARY_BUS = 0x19
PCI_SUBORDINATE_BUS = 0x1A
PCI_SEC_LATENCY_TIMER = 0x1B
PCI_IO_BASE = 0x1C  # u8; low nibble: 0 = 16-bit I/O decode
PCI_IO_LIMIT = 0x1D
PCI_SEC_STATUS = 0x1E  # u16, same bits as PCI_STATUS
PCI_MEMORY_BASE = 0x20  # u16, bits 15:4 are address bits 31:20
PCI_MEMORY_LIMIT = 0x22
PCI_PREF_MEMORY_BASE = 0x24  # u16; low nibble 1 = 64-bit prefetchable window
PCI_PREF_MEMORY_LIMIT = 0x26
PCI_PREF_BASE_UPPER32 = 0x28
PCI_PREF_LIMIT_UPPER32 = 0x2C
PCI_IO_BASE_UPPER16 = 0x30
PCI_IO_LIMIT_UPPER16 = 0x32
PCI_ROM_ADDRESS1 = 0x38
PCI_BRIDGE_CONTROL = 0x3E  # u16

PCI_IO_RANGE_TYPE_16 = 0x00
PCI_PREF_RANGE_TYPE_64 = 0x01
PCI_BRIDGE_CTL_WRITABLE = 0x007F  # parity, SERR, ISA, VGA, VGA16, master-abort mode, secondary bus reset

# --- Capability list (§7.5.1.1.11 and §7.6) ------------------------------------------------------------------
PCI_CAP_LIST_ID = 0  # u8 capability ID
PCI_CAP_LIST_NEXT = 1  # u8 offset of the next one, 0 ends the list
PCI_CAP_ID_SLOTID = 0x04  # Slot Identification (PCI-to-PCI Bridge Architecture 1.2 §13.2)
PCI_CAP_ID_EXP = 0x10  # PCI Express capability
PCI_CAP_START = 0x40  # first byte after the standard header

# Slot Identification capability, offsets from its start
PCI_SID_ESR = 2  # u8 Expansion Slot Register
PCI_SID_ESR_NSLOTS = 0x1F  # number of expansion slots
PCI_SID_ESR_FIC = 0x20  # first in chassis
PCI_SID_CHASSIS_NR = 3  # u8 chassis number, read-write
PCI_SID_SIZEOF = 4

PCI_EXT_CAP_START = 0x100  # the extended capability list starts here (§7.6.1)
PCI_EXT_CAP_ID_ERR = 0x0001  # Advanced Error Reporting


def pci_ext_cap_header(cap_id: int, version: int, next_offset: int) -> int:
    """The u32 header of an extended capability (§7.6.3): ID 15:0, version 19:16, next 31:20."""
    return cap_id | (version << 16) | (next_offset << 20)


# --- PCI Express capability (§7.5.3), offsets from its start ------------------------------------------------
PCI_EXP_FLAGS = 0x02  # u16 PCI Express Capabilities register
PCI_EXP_FLAGS_VERS = 0x000F
PCI_EXP_FLAGS_TYPE = 0x00F0
PCI_EXP_FLAGS_TYPE_SHIFT = 4
PCI_EXP_FLAGS_SLOT = 0x0100  # slot implemented (root/downstream ports with a slot)
PCI_EXP_DEVCAP = 0x04  # u32
PCI_EXP_DEVCAP_RBER = 0x00008000  # role-based error reporting, required since PCIe 1.1
PCI_EXP_DEVCTL = 0x08  # u16
PCI_EXP_DEVCTL_CERE = 0x0001
PCI_EXP_DEVCTL_NFERE = 0x0002
PCI_EXP_DEVCTL_FERE = 0x0004
PCI_EXP_DEVCTL_URRE = 0x0008
PCI_EXP_DEVCTL_WRITABLE = 0x79FF  # error enables, RO, MPS, ext tag, no snoop, MRRS
PCI_EXP_DEVSTA = 0x0A  # u16
PCI_EXP_DEVSTA_CED = 0x0001  # correctable error detected
PCI_EXP_DEVSTA_NFED = 0x0002  # non-fatal error detected
PCI_EXP_DEVSTA_FED = 0x0004  # fatal error detected
PCI_EXP_DEVSTA_URD = 0x0008  # unsupported request detected
PCI_EXP_DEVSTA_ERROR_BITS = 0x000F  # all write-1-to-clear
PCI_EXP_LNKCAP = 0x0C  # u32
PCI_EXP_LNKCAP_SLS_2_5GB = 0x00000001  # max link speed: 2.5 GT/s
PCI_EXP_LNKCAP_MLW_X1 = 0x00000010  # max link width x1 (bits 9:4)
PCI_EXP_LNKCAP_DLLLARC = 0x00100000  # Data Link Layer Link Active reporting capable
PCI_EXP_LNKCAP_PN_SHIFT = 24  # port number
PCI_EXP_LNKCTL = 0x10  # u16
PCI_EXP_LNKCTL_ENDPOINT_WRITABLE = 0x00C3  # ASPM control, common clock, extended synch
PCI_EXP_LNKCTL_PORT_WRITABLE = 0x00D3  # the same plus Link Disable
PCI_EXP_LNKSTA = 0x12  # u16
PCI_EXP_LNKSTA_CLS_2_5GB = 0x0001  # current link speed
PCI_EXP_LNKSTA_NLW_X1 = 0x0010  # negotiated width x1
PCI_EXP_LNKSTA_SLC = 0x1000  # slot clock configuration
PCI_EXP_LNKSTA_DLLLA = 0x2000  # Data Link Layer link active
PCI_EXP_LNKSTA_BW_STATUS_BITS = 0xC000  # link bandwidth management / autonomous bandwidth: RW1C
PCI_EXP_SLTCAP = 0x14  # u32
PCI_EXP_SLTCAP_HPS = 0x00000020  # hot-plug surprise
PCI_EXP_SLTCAP_HPC = 0x00000040  # hot-plug capable
PCI_EXP_SLTCAP_NCCS = 0x00040000  # no command completed support: no completion interrupts to wait for
PCI_EXP_SLTCAP_PSN_SHIFT = 19  # physical slot number, bits 31:19
PCI_EXP_SLTCTL = 0x18  # u16
PCI_EXP_SLTCTL_WRITABLE = 0x1FFF
PCI_EXP_SLTSTA = 0x1A  # u16
PCI_EXP_SLTSTA_PDC = 0x0008  # presence detect changed (RW1C)
PCI_EXP_SLTSTA_PDS = 0x0040  # presence detect state (RO)
PCI_EXP_SLTSTA_DLLSC = 0x0100  # data link layer state changed (RW1C)
PCI_EXP_SLTSTA_EVENT_BITS = 0x011F  # ABP, PFD, MRLSC, PDC, CC, DLLSC: all RW1C
PCI_EXP_RTCTL = 0x1C  # u16
PCI_EXP_RTCTL_WRITABLE = 0x001F
PCI_EXP_RTCAP = 0x1E  # u16
PCI_EXP_RTSTA = 0x20  # u32
PCI_EXP_RTSTA_PME = 0x00010000  # RW1C
PCI_EXP_DEVCAP2 = 0x24
PCI_EXP_DEVCTL2 = 0x28  # u16
PCI_EXP_DEVCTL2_ENDPOINT_WRITABLE = 0x001F  # completion timeout value and disable
PCI_EXP_DEVCTL2_PORT_WRITABLE = 0x003F  # the same plus ARI forwarding enable
PCI_EXP_DEVSTA2 = 0x2A
PCI_EXP_LNKCAP2 = 0x2C  # u32
PCI_EXP_LNKCAP2_SLS_2_5GB = 0x00000002  # supported link speeds vector
PCI_EXP_LNKCTL2 = 0x30  # u16
PCI_EXP_LNKCTL2_TLS_2_5GT = 0x0001  # target link speed
PCI_EXP_LNKCTL2_WRITABLE = 0x000F
PCI_EXP_LNKSTA2 = 0x32
PCI_EXP_SLTCAP2 = 0x34
PCI_CAP_EXP_SIZEOF = 0x3C  # a version 2 capability, slot registers included

# Device/Port Type, PCI_EXP_FLAGS bits 7:4 (§7.5.3.2)
PCI_EXP_TYPE_ENDPOINT = 0x0
PCI_EXP_TYPE_LEG_END = 0x1
PCI_EXP_TYPE_ROOT_PORT = 0x4
PCI_EXP_TYPE_UPSTREAM = 0x5
PCI_EXP_TYPE_DOWNSTREAM = 0x6
PCI_EXP_TYPE_PCI_BRIDGE = 0x7
PCI_EXP_TYPE_PCIE_BRIDGE = 0x8
PCI_EXP_TYPE_RC_END = 0x9  # Root Complex integrated endpoint
PCI_EXP_TYPE_RC_EC = 0xA  # Root Complex event collector

# --- Advanced Error Reporting extended capability (§7.8.4), offsets from its start ------------------------------
PCI_ERR_UNCOR_STATUS = 0x04  # u32, RW1C (sticky)
PCI_ERR_UNCOR_MASK = 0x08  # u32, RW
PCI_ERR_UNCOR_SEVER = 0x0C  # u32, RW: 1 = fatal
PCI_ERR_COR_STATUS = 0x10  # u32, RW1C
PCI_ERR_COR_MASK = 0x14  # u32, RW
PCI_ERR_CAP = 0x18  # u32 Advanced Error Capabilities and Control
PCI_ERR_CAP_FEP_MASK = 0x0000001F  # First Error Pointer (ROS)
PCI_ERR_HEADER_LOG = 0x1C  # 4 x u32
PCI_ERR_ROOT_COMMAND = 0x2C  # u32, RW (root ports)
PCI_ERR_ROOT_CMD_WRITABLE = 0x00000007
PCI_ERR_ROOT_STATUS = 0x30  # u32 (root ports)
PCI_ERR_ROOT_STATUS_BITS = 0x0000007F  # ERR_COR received ... fatal error messages received: RW1C
PCI_ERR_ROOT_ERR_SRC = 0x34  # u32, RO
PCI_ERR_SIZEOF = 0x48  # with the TLP prefix log, as QEMU's PCI_ERR_SIZEOF

# Uncorrectable error bits (§7.8.4.2)
PCI_ERR_UNC_DLP = 0x00000010  # data link protocol
PCI_ERR_UNC_SURPDN = 0x00000020  # surprise down
PCI_ERR_UNC_POISON_TLP = 0x00001000
PCI_ERR_UNC_FCP = 0x00002000  # flow control protocol
PCI_ERR_UNC_COMP_TIME = 0x00004000
PCI_ERR_UNC_COMP_ABORT = 0x00008000
PCI_ERR_UNC_UNX_COMP = 0x00010000
PCI_ERR_UNC_RX_OVER = 0x00020000
PCI_ERR_UNC_MALF_TLP = 0x00040000
PCI_ERR_UNC_ECRC = 0x00080000
PCI_ERR_UNC_UNSUP = 0x00100000  # Unsupported Request, bit 20
PCI_ERR_UNC_ACSV = 0x00200000
PCI_ERR_UNC_INTN = 0x00400000  # uncorrectable internal error
PCI_ERR_UNC_IMPLEMENTED = (
    PCI_ERR_UNC_DLP
    | PCI_ERR_UNC_SURPDN
    | PCI_ERR_UNC_POISON_TLP
    | PCI_ERR_UNC_FCP
    | PCI_ERR_UNC_COMP_TIME
    | PCI_ERR_UNC_COMP_ABORT
    | PCI_ERR_UNC_UNX_COMP
    | PCI_ERR_UNC_RX_OVER
    | PCI_ERR_UNC_MALF_TLP
    | PCI_ERR_UNC_ECRC
    | PCI_ERR_UNC_UNSUP
    | PCI_ERR_UNC_ACSV
    | PCI_ERR_UNC_INTN
)
# Default severity (§7.8.4.4): DLP, surprise down, FCP, receiver overflow, malformed TLP, internal: fatal.
PCI_ERR_UNC_SEVER_DEFAULT = 0x00462030
# Correctable error bits (§7.8.4.5): receiver, bad TLP, bad DLLP, replay rollover, replay timer, advisory
# non-fatal, corrected internal, header log overflow.
PCI_ERR_COR_IMPLEMENTED = 0x0000F1C1
PCI_ERR_COR_MASK_DEFAULT = 0x00006000  # advisory non-fatal and corrected internal masked (§7.8.4.6)
