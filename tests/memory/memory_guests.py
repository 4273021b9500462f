"""Helpers for the memory tests: backends, strategies, and a table-driven 64-bit test guest.

(A module of its own, not conftest.py: several test folders have a conftest, and `from conftest
import ...` would find whichever was imported first.)

The guest walks a table of accesses that the host writes into RAM: each entry is 32 bytes,
`{u64 addr; u64 op; u64 value; u64 result}`; op is the access size (1, 2, 4, 8) for a read, or
0x100 | size for a write of `value`. The guest stores what each read returned in `result`, then
HLTs. The host side answers MMIO exits through GuestMemory, drains the coalesced ring at every exit
(as the run loop must) and counts the exits by kind.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field

import pytest

from access_table_guest import ENTRY, access_table_guest, pack_table, read_results
from guestasm import assemble
from memory_exits import answer_mmio
from pcihole.hv import exits, kvm_available, x86_cpu_state
from pcihole.memory import GuestMemory, GuestRange, Hole, MemoryMap, Ram

MiB = 1 << 20
CODE = 0x1000
STACK = 0x8000
TABLE = 0x10000
PAGE_TABLES = 0x100000
RAM_SIZE = 2 * MiB
ECAM = 0xE0000000  # below 4 GiB: reachable with the identity map of x86_cpu_state.enter_long_mode
ECAM_SIZE = 256 * MiB

KVM_UNAVAILABLE = kvm_available()
MODEL_MISSING = (
    None
    if importlib.util.find_spec("pcihole.hv.model.system") is not None
    else "the model backend (pcihole.hv.model.system) is not in the tree yet"
)

# What each backend can express (DESIGN.md "Strategies").
STRATEGIES_BY_BACKEND = {
    "kvm": ("exit", "ro-filled", "ro-alias"),
    "model": ("exit", "ro-filled", "ro-alias", "native", "mmio-bus"),
}
BACKEND_STRATEGIES = [
    pytest.param(b, s, id=f"{b}-{s}", marks=[pytest.mark.kvm] if b == "kvm" else [])
    for b, strategies in STRATEGIES_BY_BACKEND.items()
    for s in strategies
]
BACKENDS = [pytest.param("kvm", marks=pytest.mark.kvm), "model"]


def open_hv(name: str):
    from pcihole.hv import open_backend

    if name == "kvm" and KVM_UNAVAILABLE is not None:
        pytest.skip(f"needs /dev/kvm: {KVM_UNAVAILABLE}")
    if name == "model" and MODEL_MISSING is not None:
        pytest.skip(MODEL_MISSING)
    return open_backend(name)


GUEST_SOURCE = access_table_guest(TABLE)


@dataclass
class RunResult:
    results: list[int]
    exits: Counter = field(default_factory=Counter)
    #: Every coalesced-ring entry drained during the run, in order.
    coalesced: list = field(default_factory=list)

    @property
    def mmio_reads(self) -> int:
        return self.exits["MmioRead"]

    @property
    def mmio_writes(self) -> int:
        return self.exits["MmioWrite"]


class TableGuest:
    """A VM with RAM at [0, 2 MiB), a 256 MiB hole at ECAM, and the table-driven guest."""

    def __init__(self, hv, strategy: str, *, holes: list[Hole] | None = None, source: str = GUEST_SOURCE):
        self.hv = hv
        self.vm = hv.create_vm()
        self.mem = GuestMemory(hv, self.vm, strategy)
        self.ram = Ram(GuestRange.from_size(0, RAM_SIZE), "ram")
        holes = holes if holes is not None else [Hole(GuestRange.from_size(ECAM, ECAM_SIZE), "ecam")]
        self.mem.update(MemoryMap([self.ram, *holes]))
        self.code = assemble(source, bits=64, org=CODE)
        self.vcpu = self.vm.create_vcpu(0)

    def run_table(self, ops: list[tuple[int, int, int]], *, max_exits: int = 100_000) -> RunResult:
        """ops: (addr, op, value). Returns each entry's result and the exits by kind."""
        mem = self.mem
        mem.write_guest(CODE, self.code)
        table = pack_table(ops)
        mem.write_guest(TABLE, table)
        x86_cpu_state.enter_long_mode(
            self.vcpu, CODE, page_tables_gpa=PAGE_TABLES, write_guest=mem.write_guest, rsp=STACK
        )
        out = RunResult([])
        for _ in range(max_exits):
            exit_ = self.vcpu.run()
            out.exits[type(exit_).__name__] += 1
            drained = self.vcpu.drain_coalesced_mmio()
            out.coalesced += drained
            leftover = mem.view.coalesced(drained)
            assert leftover == [], f"ring entries outside any hole zone: {leftover}"
            if isinstance(exit_, exits.Hlt):
                break
            if isinstance(exit_, exits.MmioRead | exits.MmioWrite):
                assert answer_mmio(mem.view, self.vcpu, exit_), f"{exit_} is in no region"
                continue
            raise AssertionError(f"unexpected exit {exit_} at rip={self.vcpu.get_regs().rip:#x}")
        else:
            raise AssertionError("the guest did not finish")
        raw = mem.read_guest(TABLE + 8, len(ops) * ENTRY.size)
        out.results = read_results(raw, len(ops))
        return out

    def close(self) -> None:
        self.mem.close()
        self.vm.close()


class FakeFunction:
    """A fake PCI function's config page: byte i reads as (i * 7 + 0x11) & 0xff; writes are recorded."""

    def __init__(self, seed: int = 0x11) -> None:
        self.seed = seed
        self.writes: list[tuple[int, bytes]] = []

    def byte(self, offset: int) -> int:
        return (offset * 7 + self.seed) & 0xFF

    def bytes_at(self, offset: int, size: int) -> bytes:
        return bytes(self.byte(offset + i) for i in range(size))

    def read(self, offset: int, size: int) -> bytes:
        return self.bytes_at(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def bytes_written(writes) -> dict[int, int]:
    """{guest address: byte} of a list of (addr, data) writes; fails if any byte is written twice.

    Backends may split a write into several pieces (KVM splits at page boundaries, the model's
    Unicorn CPU splits unaligned accesses further), so tests compare bytes, not accesses.
    """
    out: dict[int, int] = {}
    for addr, data in writes:
        for i, b in enumerate(data):
            assert addr + i not in out, f"byte {addr + i:#x} written twice"
            out[addr + i] = b
    return out


def expected_bytes(writes: list[tuple[int, int, int]]) -> dict[int, int]:
    """Same, from (addr, size, value) as the guest table has them."""
    return bytes_written([(a, v.to_bytes(8, "little")[:s]) for a, s, v in writes])
