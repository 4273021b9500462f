"""The model's vCPU: run()/exits lifecycle, memslot changes between exits, start states, teardown."""

from __future__ import annotations

import errno
import gc
import os
import time

import pytest

from pcihole.host.mman import MAP_SHARED, PROT_READ, HostMapping
from pcihole.hv import exits
from pcihole.hv.model import instruction_hooks
from pcihole.hv.model.capabilities import MODEL_CAPABILITIES
from pcihole.hv.model.cpu import UnsupportedCpuState
from pcihole.hv.proposed import KVM_CAP_MMIO_FILL, KVM_CAP_PCI_HOLE_MEM, KVM_MEM_PCI_HOLE
from pcihole.hv.uapi import KvmCap, KvmMemFlag
from pcihole.hv.x86_cpu_state import enter_long_mode, enter_protected_mode_flat
from tests.backends import BACKENDS
from tests.guest_runner import close_run, flat_vcpu, read_answer, run_guest
from tests.guestasm import assemble

SLOT_GPA = 0x300000


@pytest.mark.kvm
def test_capabilities_match_the_kernel(kvm_hv, model_hv):
    """Every capability the model implements answers what this host's kernel answers."""
    for cap, value in MODEL_CAPABILITIES.items():
        if cap in (KVM_CAP_PCI_HOLE_MEM, KVM_CAP_MMIO_FILL):
            continue
        assert kvm_hv.check_extension(cap) == value == model_hv.check_extension(cap), KvmCap(cap).name
    assert model_hv.check_extension(KvmCap.KVM_CAP_GUEST_MEMFD) == 0  # not implemented -> 0
    assert model_hv.check_extension(KVM_CAP_PCI_HOLE_MEM) == 1


def remap_guest() -> str:
    return f"""
        mov {SLOT_GPA:#x}, %eax
        out %al, $0x10
        mov {SLOT_GPA:#x}, %ebx
        out %al, $0x11
        mov {SLOT_GPA:#x}, %ecx
        mov %eax, 0x2000
        mov %ebx, 0x2004
        mov %ecx, 0x2008
        hlt
    """


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
def test_memslot_changes_between_exits_take_effect(hypervisor):
    """Delete the slot at the first OUT, re-create it elsewhere-backed at the second."""
    vm = hypervisor.create_vm()
    ram = HostMapping.anonymous(0x100000)
    a, b = HostMapping.anonymous(0x1000), HostMapping.anonymous(0x1000)
    a.write(0, b"AAAA")
    b.write(0, b"BBBB")
    try:
        ram.write(0x1000, assemble(remap_guest(), org=0x1000))
        vm.set_user_memory_region(0, 0, 0, 0x100000, ram.addr)
        vm.set_user_memory_region(1, 0, SLOT_GPA, 0x1000, a.addr)
        vcpu = vm.create_vcpu(0)
        enter_protected_mode_flat(vcpu, 0x1000, esp=0x8000)
        assert vcpu.run() == exits.IoOut(0x10, 1, b"A")
        vm.set_user_memory_region(1, 0, 0, 0, 0)
        assert vcpu.run() == exits.MmioRead(SLOT_GPA, 4)
        vcpu.complete_read(b"MMIO")
        assert vcpu.run() == exits.IoOut(0x11, 1, b"A")
        vm.set_user_memory_region(1, 0, SLOT_GPA, 0x1000, b.addr)
        assert vcpu.run() == exits.Hlt()
        assert ram.read(0x2000, 12) == b"AAAAMMIOBBBB"
    finally:
        vm.close()
        for m in (ram, a, b):
            m.close()


@pytest.mark.parametrize("hypervisor", BACKENDS, indirect=True)
def test_long_mode_guest(hypervisor):
    """64-bit long mode with identity page tables; an access above the mapped 4 GiB triple-faults."""
    vm = hypervisor.create_vm()
    ram = HostMapping.anonymous(0x200000)
    try:
        code = assemble(
            """
            mov 0x100000, %eax
            mov %rax, 0x2000
            movabs $0x123456789abcdef0, %rbx
            mov %rbx, 0x2008
            out %al, $0x20
            movabs $0x100000000, %rcx
            mov (%rcx), %eax
            hlt
            """,
            bits=64,
            org=0x1000,
        )
        ram.write(0x1000, code)
        vm.set_user_memory_region(0, 0, 0, 0x100000, ram.addr)
        vm.set_user_memory_region(1, 0, 0x180000, 0x80000, ram.addr + 0x180000)
        vcpu = vm.create_vcpu(0)
        enter_long_mode(
            vcpu, 0x1000, page_tables_gpa=0x180000, write_guest=lambda gpa, data: ram.write(gpa, data)
        )
        assert vcpu.run() == exits.MmioRead(0x100000, 4)
        vcpu.complete_read(b"\x01\x02\x03\x04")
        assert vcpu.run() == exits.IoOut(0x20, 1, b"\x01")
        assert ram.read(0x2000, 16) == b"\x01\x02\x03\x04\0\0\0\0" + (0x123456789ABCDEF0).to_bytes(
            8, "little"
        )
        assert vcpu.run() == exits.Shutdown()
        assert vcpu.get_regs().rbx == 0x123456789ABCDEF0
    finally:
        vm.close()
        ram.close()


def test_unsupported_start_state_is_refused(model_hv):
    vm = model_hv.create_vm()
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cr0 = 1 | (1 << 31)  # 32-bit paging
    with pytest.raises(UnsupportedCpuState, match="32-bit paging"):
        vcpu.set_sregs(sregs)


def test_bad_hva_faults_in_run_not_at_set_time(model_hv):
    """The kernel never dereferences userspace_addr at set time; KVM_RUN then fails with EFAULT."""
    vm = model_hv.create_vm()
    ram = HostMapping.anonymous(0x100000)
    ram.write(0x1000, assemble(f"mov {SLOT_GPA:#x}, %eax\nhlt", org=0x1000))
    vm.set_user_memory_region(0, 0, 0, 0x100000, ram.addr)
    vm.set_user_memory_region(1, 0, SLOT_GPA, 0x1000, 0x7FFF00000000)  # nothing mapped there
    vcpu = vm.create_vcpu(0)
    enter_protected_mode_flat(vcpu, 0x1000)
    with pytest.raises(OSError) as e:
        vcpu.run()
    assert e.value.errno == errno.EFAULT
    vm.close()
    ram.close()


def test_write_to_a_ram_slot_over_read_only_host_pages_faults(model_hv):
    ro = HostMapping.anonymous(0x1000, prot=PROT_READ)

    def setup(vm):
        vm.set_user_memory_region(1, 0, SLOT_GPA, 0x1000, ro.addr)

    with pytest.raises(OSError) as e:
        run_guest(model_hv, f"mov {SLOT_GPA:#x}, %eax\nmovl $1, {SLOT_GPA:#x}\nhlt", setup=setup)
    assert e.value.errno == errno.EFAULT
    ro.close()


def test_close_unwinds_a_vcpu_suspended_inside_unicorn(model_hv):
    vm = model_hv.create_vm()
    ram = HostMapping.anonymous(0x100000)
    ram.write(0x1000, assemble("1: mov 0x100000, %eax\njmp 1b", org=0x1000))
    vm.set_user_memory_region(0, 0, 0, 0x100000, ram.addr)
    vcpu = vm.create_vcpu(0)
    enter_protected_mode_flat(vcpu, 0x1000)
    assert vcpu.run() == exits.MmioRead(0x100000, 4)
    guest = vcpu._guest
    assert guest and not guest.dead  # suspended inside the read callback, inside emu_start
    vm.close()
    assert guest.dead
    with pytest.raises(OSError) as e:
        vcpu.run()
    assert e.value.errno == errno.EBADF
    ram.close()


def test_many_exits_and_an_ecam_scan_over_each_kind_of_hole(model_hv):
    """20000 MMIO-read exits in a row, then a 256-bus ECAM scan over a PCI_HOLE slot, a ro-alias
    slot and a fill device: every read all-ones, no exit. The costs are printed, not asserted
    (timings belong in `pcihole bench`)."""
    n = 20000
    source = f"mov ${n}, %ecx\n1: mov 0x100000, %eax\ndec %ecx\njnz 1b\nhlt"
    run = run_guest(model_hv, source, max_exits=1)
    try:
        vcpu, t0 = run.vcpu, time.perf_counter()
        vcpu.complete_read(read_answer(0x100000, 4))
        for _ in range(n - 1):
            exit_ = vcpu.run()
            vcpu.complete_read(read_answer(exit_.addr, exit_.size))
        assert vcpu.run() == exits.Hlt()
        per_exit = (time.perf_counter() - t0) / n
    finally:
        close_run(run)
    scan = """
        mov $0xe0000000, %esi
        xor %ecx, %ecx
        xor %edi, %edi
    1:  mov (%esi), %eax
        cmp $0xffffffff, %eax
        je 2f
        inc %edi
    2:  add $0x8000, %esi
        inc %ecx
        cmp $8192, %ecx
        jne 1b
        mov %edi, 0x2000
        hlt
    """
    alias = ro_alias_mapping(256 << 20)
    strategies = {
        "native": lambda vm: vm.set_user_memory_region(1, KVM_MEM_PCI_HOLE, 0xE0000000, 256 << 20, 0),
        "ro-alias": lambda vm: vm.set_user_memory_region(
            1, KvmMemFlag.KVM_MEM_READONLY, 0xE0000000, 256 << 20, alias.addr
        ),
        "mmio-bus": lambda vm: vm.register_mmio_fill(0xE0000000, 256 << 20),
    }
    seconds = {}
    for name, setup in strategies.items():
        t0 = time.perf_counter()
        run = run_guest(model_hv, scan, setup=setup)
        seconds[name] = time.perf_counter() - t0
        try:
            assert run.exits == [exits.Hlt()], name
            assert run.results[:4] == bytes(4), name  # all 8192 reads were all-ones
        finally:
            close_run(run)
    alias.close()
    print(
        f"model: {per_exit * 1e6:.2f} us per MMIO-read exit; 256-bus ECAM scan (8192 reads):",
        ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items()),
    )


def ro_alias_mapping(size: int) -> HostMapping:
    """The ro-alias strategy's backing: one 64 KiB memfd of 0xff mapped side by side, read-only."""
    fd = os.memfd_create("test-alias", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x10000)
    os.pwrite(fd, b"\xff" * 0x10000, 0)
    reservation = HostMapping.reserve(size)
    for offset in range(0, size, 0x10000):
        reservation.map_fixed(offset, 0x10000, PROT_READ, MAP_SHARED, fd)
    os.close(fd)
    return reservation


def test_zero_memory_regions(model_hv):
    """set_memory_region_test's test_zero_memory_regions: no memslots -> KVM_EXIT_INTERNAL_ERROR.

    Model only: the selftest first sets KVM_SET_NR_MMU_PAGES = 64, which the interface lacks; without
    it this host's kernel fails KVM_RUN with ENOSPC (no shadow MMU pages), a case the model leaves out.
    """
    vm = model_hv.create_vm()
    vcpu = vm.create_vcpu(0)
    enter_protected_mode_flat(vcpu, 0x1000)
    assert isinstance(vcpu.run(), exits.InternalError)
    vm.close()


def _live_skip_thunks() -> int:
    """The ctypes thunks of the RDTSC / RDTSCP hooks' C type alive in this process, after a
    collection (the binding's CPUID hooks have that type too)."""
    gc.collect()
    return sum(isinstance(o, instruction_hooks._INSN_SKIP_CFUNC) for o in gc.get_objects())


def test_only_the_current_engine_keeps_its_rdtsc_thunks(model_hv):
    """Each engine gets ctypes thunks for its RDTSC / RDTSCP hooks (instruction_hooks.py); the vCPU
    builds a new engine at every KVM_SET_SREGS (a mode switch), and the old engines' thunks must go
    with the old engines, not pile up for the vCPU's life. RDTSC runs in each engine (a thunk freed
    too early would crash it). The guest's bytes run alike in real and 32-bit protected mode; each
    KVM_SET_SREGS moves it to the other, which takes an engine of that mode."""
    guest = """
    1:  rdtsc
        out %al, $0x80
        jmp 1b
    """
    with flat_vcpu(model_hv, guest) as vcpu:
        starts = vcpu.engine_starts
        flat = vcpu.get_sregs()  # flat protected mode, as set (no engine yet)
        real = vcpu.get_sregs()
        real.cr0 &= ~1
        real.cs.selector = real.cs.base = 0
        assert isinstance(vcpu.run(), exits.IoOut)
        one_engine = _live_skip_thunks()
        for i in range(6):
            vcpu.set_sregs(real if i % 2 == 0 else flat)  # an engine of the other mode
            assert isinstance(vcpu.run(), exits.IoOut)
        assert vcpu.engine_starts == starts + 7  # one engine each time
        assert _live_skip_thunks() == one_engine
