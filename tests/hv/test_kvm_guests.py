"""Tiny guests on the real /dev/kvm: what each kind of guest access costs and returns.

Guest code is 32-bit flat protected mode (the PVH entry state) at CODE; RAM is slot 0 at [0, 1 MiB).
"""

from __future__ import annotations

import pytest

from pcihole.host.mman import HostMapping
from pcihole.hv import exits, x86_cpu_state
from pcihole.hv.uapi import KVM_COALESCED_MMIO_MAX, KvmMemFlag
from tests.guestasm import assemble

pytestmark = pytest.mark.kvm

CODE = 0x1000
RESULT = 0x8000  # guest stores what it read here
MMIO = 0xC0000000  # no slot here
RO_GPA = 0xD0000000
MiB = 1 << 20


class Guest:
    def __init__(self, vm, source: str, *, bits: int = 32):
        self.vm = vm
        self.ram = HostMapping.anonymous(MiB)
        self.ram.write(CODE, assemble(source, bits=bits, org=CODE))
        vm.set_user_memory_region(0, 0, 0, MiB, self.ram.addr)
        self.vcpu = vm.create_vcpu(0)
        if bits == 32:
            x86_cpu_state.enter_protected_mode_flat(self.vcpu, CODE, esp=0x7000)
        else:
            x86_cpu_state.enter_long_mode(
                self.vcpu, CODE, page_tables_gpa=0x10000, write_guest=self.ram.write, rsp=0x7000
            )

    def run(self) -> exits.VcpuExit:
        return self.vcpu.run()

    def result(self, size: int = 4, offset: int = 0) -> int:
        return int.from_bytes(self.ram.read(RESULT + offset, size), "little")

    def close(self):
        self.vcpu.close()
        self.ram.close()


@pytest.fixture
def guest(kvm_vm):
    made = []

    def make(source, **kw):
        made.append(Guest(kvm_vm, source, **kw))
        return made[-1]

    yield make
    for g in made:
        g.close()


def test_hlt(guest):
    g = guest("hlt")
    assert g.run() == exits.Hlt()
    assert g.vcpu.get_regs().rip == CODE + 1


@pytest.mark.parametrize(
    ("size", "insn"), [(1, "movb {a}, %al"), (2, "movw {a}, %ax"), (4, "movl {a}, %eax")]
)
def test_mmio_read_of_unbacked_memory_exits_and_gets_the_vmm_value(guest, size, insn):
    g = guest(f"xor %eax, %eax\n {insn.format(a=hex(MMIO + 0x10))}\n movl %eax, {RESULT:#x}\n hlt")
    assert g.run() == exits.MmioRead(MMIO + 0x10, size)
    value = bytes([0xA5, 0x5A, 0x3C, 0xC3][:size])
    g.vcpu.complete_read(value)
    assert g.run() == exits.Hlt()
    assert g.result() == int.from_bytes(value, "little")


def test_mmio_8_byte_read_in_long_mode(guest):
    g = guest(f"movabs ${MMIO:#x}, %rax\n mov (%rax), %rbx\n mov %rbx, {RESULT:#x}\n hlt", bits=64)
    assert g.run() == exits.MmioRead(MMIO, 8)
    g.vcpu.complete_read(bytes(range(1, 9)))
    assert g.run() == exits.Hlt()
    assert g.result(8) == int.from_bytes(bytes(range(1, 9)), "little")


def _ro_slot(vm, fill: bytes):
    backing = HostMapping.anonymous(2 * 4096)
    backing.write(0, fill * (8192 // len(fill)))
    vm.set_user_memory_region(1, KvmMemFlag.KVM_MEM_READONLY, RO_GPA, backing.size, backing.addr)
    return backing


def test_readonly_slot_read_has_no_exit_and_write_exits(guest, kvm_vm):
    g = guest(
        f"movl {RO_GPA + 0x100:#x}, %eax\n movl %eax, {RESULT:#x}\n"
        f"movl $0x11223344, {RO_GPA + 0x200:#x}\n"
        f"movl {RO_GPA + 0x200:#x}, %eax\n movl %eax, {RESULT + 4:#x}\n hlt"
    )
    with _ro_slot(kvm_vm, b"\x12\x34\x56\x78") as backing:
        assert g.run() == exits.MmioWrite(RO_GPA + 0x200, (0x11223344).to_bytes(4, "little"))
        assert g.result() == 0x78563412  # read before the write, with no exit
        assert g.run() == exits.Hlt()
        assert g.result(offset=4) == 0x78563412  # the write did not land
        assert backing.read(0x200, 4) == b"\x12\x34\x56\x78"


def test_readonly_write_inside_coalesced_zone_lands_in_ring_until_full(guest, kvm_vm):
    n = KVM_COALESCED_MMIO_MAX + 5
    g = guest(
        f"""
        mov ${RO_GPA:#x}, %edi
        mov ${n}, %ecx
    1:  movl %ecx, (%edi)
        add $4, %edi
        and ${RO_GPA | 0xFFF:#x}, %edi
        loop 1b
        hlt
        """
    )
    with _ro_slot(kvm_vm, b"\xff"):
        kvm_vm.register_coalesced_mmio(RO_GPA, 4096)
        # One entry is always left free (coalesced_mmio_write: full when (last+1) % MAX == first), so
        # MAX - 1 writes are coalesced and the next one exits.
        first_exit = g.run()
        assert first_exit == exits.MmioWrite(
            RO_GPA + 4 * (KVM_COALESCED_MMIO_MAX - 1) % 4096,
            (n - KVM_COALESCED_MMIO_MAX + 1).to_bytes(4, "little"),
        )
        ring = g.vcpu.drain_coalesced_mmio()
        assert len(ring) == KVM_COALESCED_MMIO_MAX - 1
        assert [int.from_bytes(w.data, "little") for w in ring] == list(range(n, n - len(ring), -1))
        assert all(len(w.data) == 4 and not w.pio for w in ring)
        assert [w.addr for w in ring[:3]] == [RO_GPA, RO_GPA + 4, RO_GPA + 8]
        # After the drain there is room again: the remaining writes coalesce with no exit.
        assert g.run() == exits.Hlt()
        assert len(g.vcpu.drain_coalesced_mmio()) == n - KVM_COALESCED_MMIO_MAX
        kvm_vm.unregister_coalesced_mmio(RO_GPA, 4096)


def test_port_io_in_and_out(guest):
    g = guest(
        f"""
        mov $0x3f8, %dx
        mov $0x41, %al
        out %al, %dx
        mov $0x510, %dx
        mov $0xcafe, %ax
        out %ax, %dx
        in %dx, %eax
        movl %eax, {RESULT:#x}
        hlt
        """
    )
    assert g.run() == exits.IoOut(0x3F8, 1, b"A")
    assert g.run() == exits.IoOut(0x510, 2, b"\xfe\xca")
    assert g.run() == exits.IoIn(0x510, 4)
    g.vcpu.complete_read(b"\x01\x02\x03\x04")
    assert g.run() == exits.Hlt()
    assert g.result() == 0x04030201


def test_complete_read_without_pending_read_is_refused(guest):
    g = guest("hlt")
    with pytest.raises(RuntimeError, match="without a pending"):
        g.vcpu.complete_read(b"\0")


def test_dirty_log_shows_exactly_the_pages_the_guest_wrote(guest, kvm_vm):
    pages = [0, 3, 64, 65, 511]
    stores = "\n".join(f"movl $1, {0xE0000000 + p * 4096 + 8:#x}" for p in pages)
    g = guest(stores + "\n hlt")
    with HostMapping.anonymous(2 * MiB) as logged:
        kvm_vm.set_user_memory_region(
            2, KvmMemFlag.KVM_MEM_LOG_DIRTY_PAGES, 0xE0000000, logged.size, logged.addr
        )
        assert g.run() == exits.Hlt()
        bitmap = int.from_bytes(kvm_vm.get_dirty_log(2), "little")
        assert [i for i in range(512) if bitmap >> i & 1] == pages
        # Without manual protect, GET_DIRTY_LOG clears the log.
        assert kvm_vm.get_dirty_log(2) == bytes(64)


def test_triple_fault_is_shutdown(guest):
    g = guest("ud2")  # #UD with no IDT -> #GP -> #DF -> triple fault
    assert g.run() == exits.Shutdown()


def test_kick_from_another_thread_stops_a_spinning_guest(guest):
    import threading

    g = guest("1: jmp 1b")
    timer = threading.Timer(0.2, g.vcpu.kick)
    timer.start()
    assert g.run() == exits.Interrupted()
    timer.join()
    # The kick is consumed: the guest is still spinning where it was.
    assert g.vcpu.get_regs().rip == CODE


def test_kick_before_run_makes_run_return_at_once(guest):
    g = guest("1: jmp 1b")
    g.vcpu.kick()
    assert g.run() == exits.Interrupted()
