"""Soak: a guest reads ECAM in a loop while a host thread hot-adds and removes functions at random.

Hole contract 5 (docs/design.md): every read returns the function's current config bytes or all-ones,
never zeros or stale data; no write is lost or applied twice. On every strategy of both backends.

Threads: the vCPU runs on the test's main thread through `Machine.run` (the real run loop; on kvm
KVM_RUN releases the GIL, on the model Unicorn does between callbacks), and a host thread does the
hot-plug through `HostBridge.add_function` / `remove_function`, which the machine's HotplugWiring
turns into memslot changes while the vCPU runs.

The guest (assembled below) cycles through a table of dword addresses: the pages of the functions
that come and go (offsets 0x0, 0x8, 0x2c, 0xffc), pages that are never present, and the host
bridge. It logs every read as (address, value) into a RAM buffer; when the buffer is full it tells
the host through port LOG_PORT, and the host checks every entry before the guest goes on. Every
WRITE_EVERY reads it also writes a dword to offset 0 (a read-only register: nothing the reader
sees can change) of a page from a second table and counts its writes. The segment has
writes = "trap", so each write must reach the VMM exactly once: either the function (a config
write) or the hole's trap handler (HostBridge.absent_write, an Unsupported Request).

How long: PCIHOLE_SOAK_SECONDS seconds of hot-plug per backend x strategy (default 4, i.e. about
a minute for the eight combinations). Seeded: PCIHOLE_SOAK_SEED (default 8).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from pcihole.machine.dispatch import StopReason
from pcihole.machine.machinefile import loads
from pcihole.pci.bdf import Bdf
from pcihole.pci.host_bridge import HostBridge
from pcihole.pci.registers import PCI_EXP_SLTSTA, PCI_EXP_SLTSTA_PDS
from pcihole.pci.topology import EndpointSpec
from tests.backends import BACKEND_STRATEGIES, needs_kvm
from tests.guest_runner import machine, pvh_kernel_from_asm
from tests.reliability.alias_seal import check_alias_sealed

SOAK_SECONDS = float(os.environ.get("PCIHOLE_SOAK_SECONDS", "4"))
SEED = int(os.environ.get("PCIHOLE_SOAK_SEED", "8"))

ECAM = 0xE0000000
PARAMS = 0x200000  # u32: n_reads, n_writes, write_every, stop, writes_done, log_count
READS = 0x201000
WRITES = 0x203000
LOG = 0x400000
LOG_ENTRIES = 4096
LOG_PORT = 0x90
WRITE_EVERY = 7
ALL_ONES = 0xFFFFFFFF

# Functions that come and go: eight Root Complex integrated endpoints on bus 0, one endpoint below
# each of two root ports (hot-plug into a port's slot), and one below each of a switch's two
# downstream ports (the same, one switch further down). Distinct device ids, so a value from the
# wrong function is caught.
CANDIDATES = [Bdf(0, 0, d, 0) for d in range(8, 16)] + [Bdf(0, 1, 0, 0), Bdf(0, 2, 0, 0)]
BELOW_SWITCH = [Bdf(0, 0x12, 0, 0), Bdf(0, 0x13, 0, 0)]
CANDIDATES += BELOW_SWITCH
NEVER_PRESENT = [Bdf(0, 0x40, 5, 3), Bdf(0, 0, 20, 1), Bdf(0, 3, 0, 0)]
HOST_BRIDGE = Bdf(0, 0, 0, 0)
READ_OFFSETS = (0x0, 0x8, 0x2C, 0xFFC)

MACHINE_HEAD = """
[machine]
ram_mib = 8

[[segment]]
id = 0
ecam_base = 0xe0000000
buses = "0-255"
writes = "trap"

[[root_port]]
bdf = "0000:00:02.0"
secondary = 1

[[root_port]]
bdf = "0000:00:02.1"
secondary = 2

[[root_port]]
bdf = "0000:00:02.2"
secondary = 0x10
subordinate = 0x13

[[upstream_port]]
bdf = "0000:10:00.0"
secondary = 0x11
subordinate = 0x13

[[downstream_port]]
bdf = "0000:11:00.0"
secondary = 0x12

[[downstream_port]]
bdf = "0000:11:01.0"
secondary = 0x13
"""


def endpoint_toml(i: int, bdf: Bdf) -> str:
    return f"""
[[endpoint]]
bdf = "{bdf}"
vendor = 0x1af4
device = {0x1100 + i:#x}
class = 0x020000
revision = {i}
subsystem = {0x2200 + i:#x}
"""


def page(bdf: Bdf) -> int:
    return ECAM + (bdf.bus << 20 | bdf.device << 15 | bdf.function << 12)


GUEST = f"""
    mov ${PARAMS}, %ebx
    xor %ebp, %ebp            # writes done
    xor %esi, %esi            # index in READS
    xor %edx, %edx            # index in WRITES
    mov ${LOG}, %edi
    mov 8(%ebx), %ecx         # reads until the next write
loop:
    mov {READS}(,%esi,4), %eax
    mov %eax, (%edi)
    mov (%eax), %eax
    mov %eax, 4(%edi)
    add $8, %edi
    inc %esi
    cmp (%ebx), %esi
    jb 1f
    xor %esi, %esi
1:  dec %ecx
    jnz 2f
    mov 8(%ebx), %ecx
    mov {WRITES}(,%edx,4), %eax
    movl $0x5a5aa5a5, (%eax)
    inc %ebp
    inc %edx
    cmp 4(%ebx), %edx
    jb 2f
    xor %edx, %edx
2:  cmp ${LOG + 8 * LOG_ENTRIES}, %edi
    jb loop
    mov %ebp, 16(%ebx)
    movl ${LOG_ENTRIES}, 20(%ebx)
    out %al, ${LOG_PORT}      # the host checks the log
    mov ${LOG}, %edi
    cmpl $0, 12(%ebx)
    je loop
    mov $0, %al
    out %al, $0xf4            # debug-exit, status 0
    hlt
"""


class LogChecker:
    """The device at LOG_PORT: checks every logged read against what its page may hold."""

    def __init__(self, memory, allowed: dict[int, frozenset[int]]) -> None:
        self.memory = memory
        self.allowed = allowed
        self.reads = 0
        self.seen: dict[int, set[int]] = {a: set() for a in allowed}
        self.violations: list[tuple[int, int]] = []
        self.flushes = 0

    def read(self, addr: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, addr: int, data: bytes) -> None:
        count = struct.unpack_from("<I", self.memory.read_guest(PARAMS + 20, 4))[0]
        raw = self.memory.read_guest(LOG, 8 * count)
        allowed = self.allowed
        for a, v in struct.iter_unpack("<II", raw):
            ok = allowed.get(a)
            if ok is None or v not in ok:
                self.violations.append((a, v))
            else:
                self.seen[a].add(v)
        self.reads += count
        self.flushes += 1
        self.memory.write_guest(LOG, bytes(8 * count))  # a stale entry would be caught next time


def soak(backend: str, strategy: str, run_loop: str = "auto") -> dict[str, int]:
    """One soak run; asserts the contract and returns the counts. On kvm, `run_loop` "auto" is the
    C loop (it answers `exit`'s reads itself: absent pages' from its bitmap, which hot-plug keeps
    current, present functions' from their mirror pages under its seqlock)."""
    rng = random.Random(f"{SEED}-{backend}-{strategy}")
    specs_toml = {bdf: endpoint_toml(i, bdf) for i, bdf in enumerate(CANDIDATES)}
    # What each candidate's page holds when present: from a host bridge with all of them.
    full_topology = loads(MACHINE_HEAD + "".join(specs_toml.values()), "<full>").topology
    reference = HostBridge(full_topology)
    specs: dict[Bdf, EndpointSpec] = {e.bdf: e for e in full_topology.endpoints}

    allowed: dict[int, frozenset[int]] = {}
    for bdf in CANDIDATES:
        for off in READ_OFFSETS:
            allowed[page(bdf) + off] = frozenset({ALL_ONES, reference.mmio_read_int(page(bdf) + off, 4)})
    for bdf in NEVER_PRESENT:
        for off in (0x0, 0x100, 0xFFC):
            allowed[page(bdf) + off] = frozenset({ALL_ONES})
    for off in (0x0, 0x8):
        allowed[page(HOST_BRIDGE) + off] = frozenset({reference.mmio_read_int(page(HOST_BRIDGE) + off, 4)})
    reads = list(allowed)
    rng.shuffle(reads)
    writes = [page(b) for b in CANDIDATES] + [page(b) for b in NEVER_PRESENT]
    rng.shuffle(writes)

    # Start with a random half of the candidates present.
    present = {bdf for bdf in CANDIDATES if rng.random() < 0.5}
    toml = MACHINE_HEAD + "".join(specs_toml[b] for b in CANDIDATES if b in present)
    m = machine(toml, backend, strategy, pvh_kernel_from_asm(GUEST), "soak", run_loop=run_loop)
    with m:
        mem, hb = m.memory, m.host_bridge
        header = struct.pack("<6I", len(reads), len(writes), WRITE_EVERY, 0, 0, 0)
        mem.write_guest(PARAMS, header)
        mem.write_guest(READS, struct.pack(f"<{len(reads)}I", *reads))
        mem.write_guest(WRITES, struct.pack(f"<{len(writes)}I", *writes))
        checker = LogChecker(mem, allowed)
        m.pio.insert(checker, LOG_PORT, 1, "soak log")
        writes_before = hb.stats.config_writes

        toggles = [0]
        errors: list[BaseException] = []
        done = threading.Event()

        def hotplug() -> None:
            try:
                deadline = time.monotonic() + SOAK_SECONDS
                while time.monotonic() < deadline and not done.is_set():
                    bdf = rng.choice(CANDIDATES)
                    if bdf in present:
                        hb.remove_function(bdf)
                        present.discard(bdf)
                    else:
                        hb.add_function(specs[bdf])
                        present.add(bdf)
                    toggles[0] += 1
                    time.sleep(rng.uniform(0, 0.004))
            except BaseException as e:  # reported by the assertions below
                errors.append(e)
            finally:
                mem.write_guest(PARAMS + 12, struct.pack("<I", 1))

        host = threading.Thread(target=hotplug, name="hotplug")
        host.start()
        try:
            result = m.run(timeout=SOAK_SECONDS + 120)
        finally:
            done.set()
            host.join()

        assert not errors, errors
        assert result.stop.reason == StopReason.DEBUG_EXIT and result.stop.status == 0, result.stop
        assert checker.violations == [], (
            f"{len(checker.violations)} of {checker.reads} reads were neither all-ones nor the function: "
            + ", ".join(f"{a:#x}={v:#010x}" for a, v in checker.violations[:10])
        )
        assert checker.reads == checker.flushes * LOG_ENTRIES > 0
        assert toggles[0] > 0
        cand = {page(b) + off for b in CANDIDATES for off in READ_OFFSETS}
        assert any(ALL_ONES in checker.seen[a] for a in cand), "no candidate was ever seen absent"
        assert any(checker.seen[a] - {ALL_ONES} for a in cand), "no candidate was ever seen present"

        # Every trapped write reached the VMM exactly once, counted on both sides.
        guest_writes = struct.unpack_from("<I", mem.read_guest(PARAMS + 16, 4))[0]
        host_writes = hb.stats.config_writes - writes_before
        assert guest_writes > 0
        assert host_writes == guest_writes, (
            f"guest wrote {guest_writes} times, the host bridge saw {host_writes}"
        )
        c = mem.view.counters
        assert c.hole_writes_trapped + c.mmio_writes == guest_writes
        assert c.hole_writes_coalesced == 0 and c.hole_writes_discarded == 0
        n = len(writes)
        to_never_present = sum(
            guest_writes // n + (1 if i < guest_writes % n else 0)
            for i, a in enumerate(writes)
            if a in {page(b) for b in NEVER_PRESENT}
        )
        assert hb.stats.absent_writes >= to_never_present > 0
        assert hb.stats.unsupported_requests == hb.stats.absent_writes
        assert check_alias_sealed(mem) == (1 if strategy == "ro-alias" else 0)
        # Each downstream port's slot says whether its device is there now (Presence Detect State).
        for bdf in BELOW_SWITCH:
            port = hb.function(Bdf(0, 0x11, bdf.bus - 0x12, 0))
            sltsta = hb.mmio_read_int(page(port.bdf) + port.pcie_cap + PCI_EXP_SLTSTA, 2)
            assert bool(sltsta & PCI_EXP_SLTSTA_PDS) == (bdf in present), (bdf, hex(sltsta))
        return {
            "reads_checked": checker.reads,
            "violations": len(checker.violations),
            "hotplug_steps": toggles[0],
            "guest_writes": guest_writes,
            "host_writes": host_writes,
            "trapped_as_ur": hb.stats.absent_writes,
        }


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "strategy"), BACKEND_STRATEGIES)
def test_reads_are_all_ones_or_the_function_and_trapped_writes_arrive_once_while_hot_plugging(
    backend, strategy
):
    if backend == "kvm":
        summary = soak(backend, strategy)
    else:
        # In a child process, so that a crash of the model (a SIGSEGV in Unicorn, as when a deleted
        # slot's host buffer was freed while the vCPU still mapped it) costs one test, not the
        # session. Same code, same assertions (a failed one exits 1); a signal fails the test.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "src")])}
        code = (
            "import json, tests.reliability.test_soak_hotplug as t; "
            f"print(json.dumps(t.soak({backend!r}, {strategy!r})))"
        )
        cmd = [sys.executable, "-X", "faulthandler", "-c", code]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
        if proc.returncode < 0:
            pytest.fail(
                f"the soak process died of signal {-proc.returncode} "
                f"({signal.Signals(-proc.returncode).name}) (model {strategy}):\n{proc.stderr[-4000:]}"
            )
        assert proc.returncode == 0, proc.stderr[-4000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["violations"] == 0
    assert summary["guest_writes"] == summary["host_writes"] > 0
    print(f"{backend}/{strategy}: {summary}")


@pytest.mark.slow
@needs_kvm
def test_the_python_run_loop_keeps_the_contract_while_hot_plugging_too():
    """The kvm rows above run the C loop (the default); the Python loop is the reference."""
    soak("kvm", "exit", run_loop="python")
