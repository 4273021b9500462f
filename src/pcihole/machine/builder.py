"""Build a machine from a machine file, step by step (Firecracker's builder.rs):

backend -> VM (+ the in-kernel irqchip and PIT where the backend has them) -> guest memory (RAM + one hole per ECAM
window, present functions punched) -> ACPI tables -> kernel (PVH) and initrd -> boot information ->
vCPU (CPUID, MSRs, FPU, LAPIC as QEMU/Firecracker set them, host quirks) -> buses.

Each step wraps what goes wrong in one `MachineBuildError` saying which step and why.
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import replace

from pcihole.acpi import AcpiTables, ExpanderBus, build_tables
from pcihole.boot.elf import ElfError, ElfImage
from pcihole.boot.pvh import (
    E820_ACPI,
    E820_RAM,
    E820_RESERVED,
    MemmapEntry,
    PvhError,
    kernel_end,
    load_elf,
    modlist_entry,
    start_info,
)
from pcihole.guest import REPORT_SYMBOL
from pcihole.guest.report import DEFAULT_MAX_DEVICES, DeviceArea, ReportError, check_symbols
from pcihole.guest.report import DEVICE as DEVICE_STRUCT
from pcihole.hv import BackendUnavailable, open_backend
from pcihole.hv.cpu_setup import configure_vcpu
from pcihole.hv.interface import Hypervisor, InterruptLines
from pcihole.hv.kvm.c_run_loop import CRunLoop, CRunLoopUnavailable
from pcihole.hv.kvm.c_run_loop import load as load_c_run_loop
from pcihole.hv.uapi import KvmCap
from pcihole.hv.x86_cpu_state import enter_protected_mode_flat
from pcihole.machine import layout
from pcihole.machine.acpi_power import ACPI_POWER_PORT, AcpiPowerDevice
from pcihole.machine.address_width import address_width_problem
from pcihole.machine.bus import Bus
from pcihole.machine.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from pcihole.machine.ecam_window import EcamWindow, FillPagesWiring, HotplugWiring, segment_hole
from pcihole.machine.host_quirks import HostQuirksError, choose_host_quirks, kernel_args
from pcihole.machine.irq import IrqLine
from pcihole.machine.irq_routing import pc_irq_routing
from pcihole.machine.machine import Machine
from pcihole.machine.machinefile import MachineFile
from pcihole.machine.serial import COM1_BASE, COM1_IRQ, UART_REGISTERS, UART_TX, SerialConsole
from pcihole.machine.stats import RunStats
from pcihole.memory import (
    DEFAULT_TUNING,
    PAGE_SIZE,
    GuestMemory,
    GuestRange,
    Hole,
    HoleTuning,
    MemoryMap,
    Mmio,
    Ram,
    Region,
    StrategyUnavailable,
    make_strategy,
    page_range,
)
from pcihole.pci.bridge_windows import has_hotplug_slots, root_bus_need
from pcihole.pci.config_page import ConfigPage
from pcihole.pci.host_bridge import HostBridge

log = logging.getLogger(__name__)
DEVICE_SIZE = DEVICE_STRUCT.size


class MachineBuildError(RuntimeError):
    """The machine could not be built; the message names the step and the reason."""


class HostUnavailable(MachineBuildError):
    """The host cannot provide what the machine needs: /dev/kvm missing or not permitted, or a KVM
    ioctl or host mapping failing while the machine is built (not the machine file's fault)."""


def choose_backend(name: str) -> tuple[Hypervisor, str]:
    """Open the backend; "auto" is kvm where /dev/kvm opens, else the model. Returns (hv, why)."""
    if name == "auto":
        try:
            return open_backend("kvm"), "auto: /dev/kvm opens"
        except (BackendUnavailable, OSError) as e:  # the same reasons kvm_available() gives
            return open_backend("model"), f"auto: {e}; using the model"
    return open_backend(name), "asked for"


#: The vCPU loops `build_machine(run_loop=...)` takes: "c" answers the ECAM reads that exit in C
#: on kvm (hv/kvm/run_loop.c), "python" is the reference loop, "auto" is "c" where it can be built.
RUN_LOOPS = ("auto", "c", "python")


def choose_run_loop(name: str, backend: str) -> CRunLoop | None:
    """The C loop, or None for the Python loop. "auto" takes the C loop on kvm where it builds and
    says in one line (a warning) why not where it does not; the model has no KVM_RUN to loop on."""
    if name not in RUN_LOOPS:
        raise MachineBuildError(f"run loop {name!r}: choose from {', '.join(RUN_LOOPS)}")
    if name == "python":
        return None
    if backend != "kvm":
        if name == "c":
            raise MachineBuildError(f"the C run loop loops on KVM_RUN: the {backend} backend has none")
        return None
    try:
        return load_c_run_loop()
    except CRunLoopUnavailable as e:
        if name == "c":
            raise HostUnavailable(f"cannot use the C run loop: {e}") from e
        if not _c_loop_warned:
            log.warning("the C run loop is not available (%s): using the Python loop", e)
            _c_loop_warned.append(True)
        return None


_c_loop_warned: list[bool] = []  # said once per process


def _open_backend(name: str) -> tuple[Hypervisor, str]:
    """choose_backend, its failures a HostUnavailable saying which backend."""
    try:
        return choose_backend(name)
    except BackendUnavailable as e:
        raise HostUnavailable(f"cannot open the {name} backend: {_without_prefix(str(e), name)}") from e
    except OSError as e:
        raise HostUnavailable(f"cannot open the {name} backend: {e}") from e


def _coalesce_console_writes(hv: Hypervisor, vm) -> bool:
    """Put COM1's THR (port 0x3f8, one byte) in a coalesced PIO zone, where the backend has them.

    A console byte costs a Linux guest two exits: printk's serial8250_console_putchar() polls LSR
    (wait_for_xmitrdy) and then writes THR. The write needs no answer, so KVM can append it to the
    coalesced ring instead of exiting (KVM_REGISTER_COALESCED_MMIO with pio = 1, virt/kvm/
    coalesced_mmio.c), and the run loop hands it to the UART before it handles the next exit, as QEMU
    drains the ring (kvm_cpu_exec -> kvm_flush_coalesced_mmio_buffer). Every UART access that
    returns something (LSR, IIR, RBR/DLL, ...) or changes something else (IER, LCR, ...) still exits,
    so the guest sees the UART exactly as if each write had exited: the LSR read after a write
    finds the write applied, and a DLL write (LCR.DLAB set) is applied before the LCR write that
    clears DLAB. What moves is the time the THR write's side effects happen (the byte on the
    console, the THRE interrupt): to the guest's next exit, or within Machine.run's
    CONSOLE_FLUSH_SECONDS when it makes none (a THRE interrupt is asynchronous on real hardware
    too: it follows the character's transmission). The interrupt line takes the same transitions in
    the same order, so the guest gets the same interrupts.
    """
    if hv.check_extension(KvmCap.KVM_CAP_COALESCED_PIO) <= 0:
        return False
    vm.register_coalesced_mmio(COM1_BASE + UART_TX, 1, pio=True)
    return True


def build_machine(
    spec: MachineFile,
    *,
    backend: str = "auto",
    strategy: str = "auto",
    kernel: bytes,
    kernel_name: str,
    cmdline: str = "",
    serial_sink=None,
    initrd: bytes | None = None,
    host_quirks: str = "auto",
    quirk_kernel_args: bool = False,
    coalesce_console: bool = True,
    hole_tuning: HoleTuning = DEFAULT_TUNING,
    run_loop: str = "auto",
) -> Machine:
    """Build the machine. `initrd` goes above the kernel, named by the PVH modlist and reserved in
    E820; `host_quirks` is the --host-quirks choice (machine/host_quirks.py), and with
    `quirk_kernel_args` the quirks' kernel arguments are appended to `cmdline` (for Linux guests).
    With `coalesce_console` (where the backend has KVM_CAP_COALESCED_PIO), writes to COM1's THR
    cost no exit (see `_coalesce_console_writes`). `hole_tuning` sets how the hole strategy backs
    its holes (pcihole bench sweeps it). `run_loop` picks the vCPU loop (RUN_LOOPS, choose_run_loop)."""
    hv, backend_reason = _open_backend(backend)
    vm = memory = host_bridge = None
    step = "read the vCPU's physical address width"
    try:
        try:
            quirks = choose_host_quirks(host_quirks, hv.name)
        except HostQuirksError as e:
            raise MachineBuildError(str(e)) from e
        acpi = acpi_tables(spec)
        refuse_unaddressable(spec, acpi, hv)  # before any VM exists, as QEMU refuses it
        step = "create the VM"
        vm = hv.create_vm()
        irq_lines: InterruptLines | None = None
        step = "create the in-kernel irqchip and PIT"
        # QEMU's order (kvm_arch_init, kvm_irqchip_create, kvm_pc_setup_irq_routing, kvm_pit_init):
        # identity map and TSS (the Vm sets the TSS) before any vCPU, then the irqchip, a PC's GSI
        # routing (the PIT on IOAPIC pin 2, as the MADT says), then the PIT that needs the irqchip;
        # each where the backend offers it (the model: all but the identity map).
        if vm.check_extension(KvmCap.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_addr()
        if vm.check_extension(KvmCap.KVM_CAP_IRQCHIP):
            vm.create_irqchip()
            if vm.check_extension(KvmCap.KVM_CAP_IRQ_ROUTING):
                vm.set_gsi_routing(pc_irq_routing())
            if vm.check_extension(KvmCap.KVM_CAP_PIT2):
                vm.create_pit2()
            irq_lines = vm
        step = "set up guest memory"
        host_bridge = HostBridge(spec.topology)
        ram_size = spec.ram_bytes
        if ram_size < layout.MIN_RAM:
            raise MachineBuildError(
                f"{spec.path}: {spec.ram_mib} MiB of RAM is less than {layout.MIN_RAM >> 20} MiB"
            )
        holes = [segment_hole(seg, host_bridge) for seg in host_bridge.segments]
        try:
            # "auto" is chosen for these holes: native cannot fill with anything but 0xff.
            memory = GuestMemory(hv, vm, make_strategy(strategy, hv, vm, holes=holes, tuning=hole_tuning))
        except StrategyUnavailable as e:
            raise MachineBuildError(f"strategy {strategy!r} on the {hv.name} backend: {e}") from e
        c_loop = choose_run_loop(run_loop, hv.name)
        if memory.strategy.maps_mirrors or c_loop is not None:
            # The C loop answers present functions' reads that exit from their mirror pages
            # (FillPagesWiring); a strategy that maps no mirrors leaves them out of the guest's
            # memslots all the same (GuestMemory maps a mirror only where the strategy maps_mirrors).
            host_bridge.use_mirrors()

        regions: list[Region] = [Ram(GuestRange.from_size(0, ram_size), "ram")]
        pages = host_bridge.present_pages()  # sorted
        for hole in holes:
            # bisect: a scan of every page for every hole is quadratic with a thousand segments
            lo = bisect.bisect_left(pages, hole.range.start.value)
            hi = bisect.bisect_right(pages, hole.range.last.value)
            regions += punched_hole(hole, pages[lo:hi], host_bridge)
        try:
            memory.update(MemoryMap(regions))
        except (ValueError, RuntimeError) as e:
            raise MachineBuildError(f"{spec.path}: cannot lay out guest memory: {e}") from e
        hotplug = HotplugWiring(host_bridge, memory)
        host_bridge.add_listener(hotplug)

        step = "load the ACPI tables and the kernel"
        memory.write_guest(layout.ACPI_GPA, acpi.blob)

        try:
            image = ElfImage(kernel, kernel_name)
            entry = load_elf(image, memory.write_guest, ram_size, layout.LOW_MEMORY)
            # A broken symbol table, or a report outside RAM, is found now, not after the run.
            check_symbols(image, ram_size)
        except (ElfError, PvhError, ReportError) as e:
            raise MachineBuildError(str(e)) from e
        device_area = None
        if REPORT_SYMBOL in image.symbols():
            device_area = scan_device_area(spec, image, len(host_bridge.devices()))
            cmdline = f"{cmdline} {device_area.option()}".strip()
        initrd_range = None
        if initrd is not None:
            start = -(-kernel_end(image) // layout.INITRD_ALIGN) * layout.INITRD_ALIGN
            start = max(start, layout.KERNEL_MIN_GPA)
            if start + len(initrd) > ram_size:
                raise MachineBuildError(
                    f"the initrd ({len(initrd)} bytes) does not fit between the kernel's end {start:#x} and "
                    f"the end of RAM {ram_size:#x}: give the machine more RAM (ram_mib)"
                )
            memory.write_guest(start, initrd)
            memory.write_guest(layout.MODLIST_GPA, modlist_entry(start, len(initrd)))
            initrd_range = (start, len(initrd))
        if quirk_kernel_args and kernel_args(quirks):
            cmdline = " ".join([cmdline, *kernel_args(quirks)]).strip()
        cmdline_bytes = cmdline.encode() + b"\0"
        if len(cmdline_bytes) > layout.CMDLINE_MAX:
            raise MachineBuildError(
                f"the command line is {len(cmdline_bytes)} bytes, more than {layout.CMDLINE_MAX}"
            )
        memory.write_guest(layout.CMDLINE_GPA, cmdline_bytes)
        memmap = e820_map(ram_size, host_bridge, initrd_range)
        if len(memmap) > layout.MEMMAP_MAX_ENTRIES:
            raise MachineBuildError(
                f"{spec.path}: the PVH memory map needs {len(memmap)} entries, more than the "
                f"{layout.MEMMAP_MAX_ENTRIES} its area holds (one per ECAM segment, plus 4): use fewer segments"
            )
        info, table = start_info(
            cmdline_paddr=layout.CMDLINE_GPA,
            rsdp_paddr=acpi.rsdp_gpa,
            memmap_paddr=layout.MEMMAP_GPA,
            memmap=memmap,
            modlist_paddr=layout.MODLIST_GPA if initrd_range else 0,
            nr_modules=1 if initrd_range else 0,
        )
        memory.write_guest(layout.START_INFO_GPA, info)
        memory.write_guest(layout.MEMMAP_GPA, table)

        step = "create the vCPU"
        vcpu = vm.create_vcpu(0)
        if hv.check_extension(KvmCap.KVM_CAP_EXT_CPUID):
            # CPUID, MSRs, FPU as QEMU / Firecracker set them, on either backend (the model answers
            # the same ioctls: hv/model/cpuid.py, cpu_msrs.py); LINT0 / LINT1 where the backend
            # has an in-kernel LAPIC to hold them.
            configure_vcpu(
                hv,
                vcpu,
                hide_features=quirks.hide_features,
                irqchip=bool(vm.check_extension(KvmCap.KVM_CAP_IRQCHIP)),
            )
        enter_protected_mode_flat(vcpu, entry, ebx=layout.START_INFO_GPA, esp=layout.BOOT_STACK_GPA)

        stats = RunStats()
        fill_pages = (
            None if c_loop is None else FillPagesWiring(c_loop, host_bridge, hotplug, stats).fill_pages
        )
        mmio, pio = Bus("mmio"), Bus("port")
        for seg in host_bridge.segments:
            window = EcamWindow(memory.view, host_bridge, stats)
            mmio.insert(window, seg.window_base, seg.window_size, f"ECAM segment {seg.id}")
        serial = SerialConsole(serial_sink, irq=IrqLine(irq_lines, COM1_IRQ))
        pio.insert(serial, COM1_BASE, UART_REGISTERS, "COM1")
        pio.insert(DebugExit(), DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, "debug-exit")
        pio.insert(AcpiPowerDevice(), ACPI_POWER_PORT, 1, "ACPI sleep/reset")
        step = "register COM1's THR as a coalesced PIO zone"
        console_coalesced = coalesce_console and _coalesce_console_writes(hv, vm)
        return Machine(
            spec=spec,
            hv=hv,
            backend_reason=backend_reason,
            vm=vm,
            vcpu=vcpu,
            memory=memory,
            host_bridge=host_bridge,
            hotplug=hotplug,
            image=image,
            mmio=mmio,
            pio=pio,
            serial=serial,
            stats=stats,
            device_area=device_area,
            quirks=quirks,
            irq_lines=irq_lines,
            cmdline=cmdline,
            initrd_range=initrd_range,
            console_coalesced=console_coalesced,
            fill_pages=fill_pages,
        )
    except BaseException as e:
        # The VM (and its vCPU) before the memory it maps: Machine.close says why.
        if vm is not None:
            vm.close()
        if memory is not None:
            memory.close()
        if host_bridge is not None:
            host_bridge.close_mirrors()
        hv.close()
        if isinstance(e, OSError):
            # A KVM ioctl or a host mapping failed (EMFILE, ENOMEM, ...): say which step, no traceback.
            raise HostUnavailable(f"cannot {step} on the {hv.name} backend: {e}") from e
        raise


def refuse_unaddressable(spec: MachineFile, acpi: AcpiTables, hv: Hypervisor) -> None:
    """MachineBuildError, naming the machine file and the range, where the backend's vCPU cannot
    address RAM or a window of the ACPI tables (machine/address_width.py)."""
    beyond = address_width_problem(spec.ram_bytes, acpi, hv)
    if beyond is not None:
        raise MachineBuildError(f"{spec.path}: {beyond}")


def check_machine(spec: MachineFile, backend: str = "auto") -> None:
    """What build_machine refuses before it creates anything (the ACPI tables do not fit, the vCPU
    cannot address a range), without building: for callers with slow work to do before they build
    (fetching a kernel, a bench's earlier runs). HostUnavailable where the backend does not open."""
    acpi = acpi_tables(spec)
    hv, _ = _open_backend(backend)
    try:
        refuse_unaddressable(spec, acpi, hv)
    except OSError as e:
        raise HostUnavailable(
            f"cannot read the vCPU's physical address width on the {hv.name} backend: {e}"
        ) from e
    finally:
        hv.close()


def scan_device_area(spec: MachineFile, image: ElfImage, functions: int) -> DeviceArea:
    """Where the scan guest puts its device list (pcihole.devices=ADDR,MAX): at the top of RAM, room
    for every function of the machine plus DEFAULT_MAX_DEVICES (functions hot-added while it runs),
    so any machine is reported in full. MachineBuildError if it would not fit above the kernel."""
    max_devices = functions + DEFAULT_MAX_DEVICES
    size = max_devices * DEVICE_SIZE
    paddr = (spec.ram_bytes - size) & ~(PAGE_SIZE - 1)
    kernel_end = max((s.paddr + s.memsz for s in image.loadable()), default=layout.KERNEL_MIN_GPA)
    if paddr < max(kernel_end, layout.KERNEL_MIN_GPA):
        raise MachineBuildError(
            f"{spec.path}: {spec.ram_mib} MiB of RAM leaves no room above the kernel for the scan guest's "
            f"device list ({max_devices} entries, {size} bytes): give the machine more RAM"
        )
    return DeviceArea(paddr, max_devices)


def acpi_tables(spec: MachineFile) -> AcpiTables:
    """The machine's ACPI tables; MachineBuildError, naming the machine file, where they do not fit
    in the area the guest finds them in (ACPI_MAX bytes from ACPI_GPA: about 1,500 segments)."""
    try:
        acpi = build_tables(
            spec.segments,
            layout.ACPI_GPA,
            expanders=expander_buses(spec),
            needs=[root_bus_need(spec.topology, s.id, s.root_bus) for s in spec.segments],
            native_hotplug=[has_hotplug_slots(spec.topology, s.id, s.root_bus) for s in spec.segments],
            serial_ports=[(COM1_BASE, COM1_IRQ)],
        )
    except ValueError as e:
        raise MachineBuildError(f"{spec.path}: cannot build the ACPI tables: {e}") from e
    if len(acpi.blob) > layout.ACPI_MAX:
        raise MachineBuildError(
            f"{spec.path}: the ACPI tables take {len(acpi.blob)} bytes, more than the {layout.ACPI_MAX} "
            f"of the BIOS area [{layout.ACPI_GPA:#x}, {layout.ACPI_GPA + layout.ACPI_MAX - 1:#x}] "
            f"({len(spec.segments)} ECAM segments): use fewer segments"
        )
    return acpi


def _without_prefix(message: str, backend: str) -> str:
    """BackendUnavailable messages start with "<backend> backend: "; the caller says it already."""
    prefix = f"{backend} backend: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def punched_hole(hole: Hole, pages: list[int], host_bridge: HostBridge) -> list[Region]:
    """`hole` with every page in `pages` (sorted, inside it) punched out as that function's Mmio region.

    The regions MemoryMap.punch_page gives page by page, in one pass: punching page by page validates
    a whole new map each time, O(n^2 log n) in the number of functions (28 s for 2500 functions).
    """
    out: list[Region] = []
    cursor = hole.range.start.value
    for page in pages:
        rng = page_range(page)
        if page > cursor:
            out.append(replace(hole, range=GuestRange.from_bounds(cursor, page)))
        handler = ConfigPage(host_bridge, page)
        mirror = host_bridge.mirror_page(page)
        out.append(
            Mmio(
                rng, f"ecam page {page:#x}", handler=handler, mirror=mirror, underlay=replace(hole, range=rng)
            )
        )
        cursor = rng.end
    if cursor < hole.range.end:
        out.append(replace(hole, range=GuestRange.from_bounds(cursor, hole.range.end)))
    return out


def expander_buses(spec: MachineFile) -> list[ExpanderBus]:
    """The machine's expander root buses, as the DSDT describes them (acpi/expander_bridge.py)."""
    topology = spec.topology
    return [
        ExpanderBus(
            x.bdf.segment,
            x.bus,
            x.last_bus,
            need=root_bus_need(topology, x.bdf.segment, x.bus),
            native_hotplug=has_hotplug_slots(topology, x.bdf.segment, x.bus),
        )
        for x in topology.expanders
    ]


def e820_map(
    ram_size: int, host_bridge: HostBridge, initrd: tuple[int, int] | None = None
) -> list[MemmapEntry]:
    """The guest's memory map as a PC firmware would report it (Firecracker's E820 layout).

    An initrd [start, start + size) is reserved, so nothing in the guest allocates over it before
    the kernel has taken it: Linux's reserve_initrd() (arch/x86/kernel/setup.c) sees memory that is
    not mapped RAM and copies it into RAM it owns (relocate_initrd)."""
    entries = [
        MemmapEntry(0, layout.LOW_RAM_END, E820_RAM),
        MemmapEntry(layout.LOW_RAM_END, layout.ACPI_GPA - layout.LOW_RAM_END, E820_RESERVED),
        MemmapEntry(layout.ACPI_GPA, layout.ACPI_MAX, E820_ACPI),
    ]
    if initrd is None:
        entries.append(MemmapEntry(layout.KERNEL_MIN_GPA, ram_size - layout.KERNEL_MIN_GPA, E820_RAM))
    else:
        start, size = initrd
        end = -(-(start + size) // 4096) * 4096
        entries += [
            MemmapEntry(layout.KERNEL_MIN_GPA, start - layout.KERNEL_MIN_GPA, E820_RAM),
            MemmapEntry(start, end - start, E820_RESERVED),
        ]
        if end < ram_size:
            entries.append(MemmapEntry(end, ram_size - end, E820_RAM))
    # ECAM is reserved, as Firecracker and cloud-hypervisor report it (Linux needs E820 or a PNP0C02
    # _CRS before it trusts MCFG; docs/linux-ecam.md §2).
    entries += [MemmapEntry(s.window_base, s.window_size, E820_RESERVED) for s in host_bridge.segments]
    return entries


def default_kernel() -> tuple[bytes, str]:
    from pcihole.guest import IMAGE_PATH, image_bytes

    return image_bytes(), os.fspath(IMAGE_PATH)
