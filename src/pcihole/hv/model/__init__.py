"""The `model` backend: an executable reference model of KVM's memory-slot subsystem.

It implements the interface of hv/interface.py with the kernel's checks, in the kernel's order,
with the kernel's errno (docs/kvm-memslot-rules.md), plus the seed's KVM_MEM_PCI_HOLE (v2
rules) and the reviewer's MMIO-bus fill device (hv/proposed.py). Guest code runs on Unicorn; every
guest memory access resolves through the model's memslots and MMIO bus, as on a KVM vCPU.

One concept per file:
  errors.py       ModelKvmError, the OSError every failing "ioctl" raises
  capabilities.py what KVM_CHECK_EXTENSION answers
  memslots.py     KVM_SET_USER_MEMORY_REGION rules and the slot table
  page_levels.py  the largest mapping level per gfn (disallow_lpage)
  dirty_log.py    KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG
  io_bus.py       kvm_io_bus: sorted device ranges, NR_IOBUS_DEVS, dispatch order
  coalesced.py    coalesced MMIO/PIO zones and the ring page
  mmio_fill.py    the MMIO-bus fill device (reviewer's alternative)
  fill_window.py  a sealed memfd of 0xff bytes, mapped side by side (PCI_HOLE reads, no callback)
  guest_memory.py the regions of guest-physical space: what each slot and gap is (RAM, hole, ...)
  mmu.py          a vCPU's Unicorn memory map built from those regions (arch/x86/kvm/mmu/mmu.c)
  emulator_read_write.py  accesses that leave RAM, split and exited as x86.c's emulator_read_write
  cpu.py          Unicorn set up from kvm_regs / kvm_sregs; the engine's CPU model
  cpuid.py        KVM_GET_SUPPORTED_CPUID of the model, and kvm_cpuid's lookup rules
  msr.py          a vCPU's MSR table: who owns each MSR (devices register theirs)
  msr_intercept.py  how guest RDMSR / WRMSR reach Python (the engine's SVM MSR intercept)
  intercept_exits.py  what a vCPU does when those intercepts fire (RDMSR / WRMSR, HLT)
  cpu_msrs.py     the MSRs the vCPU owns itself (EFER, STAR, PAT, MTRRs, TSC, APIC_BASE, ...)
  tsc.py          the guest TSC: a fixed frequency over the host's monotonic clock
  kvmclock.py     the pvclock pages behind the kvmclock MSRs
  instruction_hooks.py  CPUID, RDTSC and RDTSCP answered by the vCPU (KVM_SET_CPUID2, guest TSC)
  fast_registers.py  register access for the hooks that run at every RDTSC and CPUID
  boundary_hook.py  another thread's request, run by the vCPU thread at an instruction boundary
  vcpu.py         KVM_RUN, kick, registers, memslot sync, close: one state enum (kvm_main.c's vCPU)
  vcpu_state.py   where a vCPU is (VcpuState) and what other threads ask of it (Request)
  long_mode_switch.py  a 32-bit engine the guest took into long mode, replaced by a 64-bit one
  irqchip.py      KVM_CREATE_IRQCHIP's devices, the default GSI routing, delivery to LAPICs
  lapic.py, lapic_irq.py  a vCPU's local APIC (lapic.c) and the interrupt message it takes
  ioapic.py, i8259.py, i8254.py  the IOAPIC, the 8259 pair, the PIT (ioapic.c, i8259.c, i8254.c)
  host_timer.py   a timer on the host's monotonic clock (KVM's hrtimer) for the LAPIC and PIT
  vm.py, system.py  the Vm / Hypervisor objects
"""
