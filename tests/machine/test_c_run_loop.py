"""The C run loop (hv/kvm/run_loop.c) against the Python loop it stands in for, on /dev/kvm.

The Python loop is the reference: the same guest must find the same devices and produce the same
statistics (exits by kind, ECAM counts, every absent-function access by address and size, the
memory map's counters) with either loop, on every kvm strategy, while the C loop answers the reads
of absent functions without Python (counted here as the reads that reach Python's ECAM windows).
Hot-plug, straddling reads, the coalesced ring's order, kicks, the timeout and a guest that spins
on absent reads are checked with the C loop; Ctrl-C and SIGTERM through the command line are in
tests/reliability/test_signals.py, the hot-plug soak in tests/reliability/test_soak_hotplug.py.
Counts only, never times.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from pcihole.hv import open_backend
from pcihole.hv.exits import MmioRead
from pcihole.hv.kvm.c_run_loop import (
    SOURCE,
    AnsweringVcpu,
    CRunLoop,
    CRunLoopUnavailable,
    FillPages,
    build,
    source_hash,
)
from pcihole.hv.kvm.vcpu import Vcpu as KvmVcpu
from pcihole.hv.model.vcpu import ModelVcpu
from pcihole.machine.builder import build_machine, default_kernel
from pcihole.machine.dispatch import ExitHandler, Stop, StopReason
from pcihole.machine.machine import device_json
from pcihole.machine.machinefile import load, load_default
from pcihole.machine.run_loop import run_until_stop
from pcihole.machine.serial import COM1_BASE
from pcihole.machine.stop_request import StopRequest
from pcihole.pci.bdf import Bdf
from pcihole.pci.topology import EndpointSpec
from tests.backends import STRATEGIES_BY_BACKEND, needs_kvm
from tests.guest_runner import machine, pvh_kernel_from_asm

ROOT = Path(__file__).resolve().parents[2]
LOOPS = ("python", "c")
needs_cc = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler (bin/setup installs gcc)"
)


# --- building --------------------------------------------------------------------------------------


@needs_cc
def test_the_c_loop_builds_from_source_into_a_cache_keyed_by_its_hash_and_loads(tmp_path):
    library = build(cache=tmp_path)
    assert library.parent == tmp_path / source_hash() and library.is_file()
    assert CRunLoop(library).run is not None  # dlopen, and pcihole_run resolves
    built = library.stat().st_mtime_ns
    assert build(cache=tmp_path) == library and library.stat().st_mtime_ns == built  # not rebuilt
    edited = tmp_path / "run_loop.c"
    edited.write_text(SOURCE.read_text() + "\n/* edited */\n")
    other = build(edited, cache=tmp_path)
    assert other.parent.name == source_hash(edited) != library.parent.name
    assert sorted(p.name for p in tmp_path.rglob("*.so")) == ["run_loop.so", "run_loop.so"]


@needs_cc
def test_a_source_that_does_not_compile_says_why_in_one_line_and_leaves_no_library(tmp_path):
    broken = tmp_path / "run_loop.c"
    broken.write_text("int pcihole_run(void) { return no_such_name; }\n")
    with pytest.raises(CRunLoopUnavailable) as e:
        build(broken, cache=tmp_path / "cache")
    assert "\n" not in str(e.value) and "no_such_name" in str(e.value), str(e.value)
    assert list((tmp_path / "cache").rglob("*.so")) == []


def test_without_a_compiler_the_c_loop_is_unavailable_saying_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(CRunLoopUnavailable, match="no C compiler .'no-such-cc' not found"):
        build(cache=tmp_path)


@needs_kvm
def test_where_the_c_loop_cannot_be_built_run_says_so_in_one_line_and_uses_the_python_loop(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CC": "no-such-cc", "XDG_CACHE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "pcihole.cli", "run", "--backend", "kvm", "--strategy", "exit", "--json"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "C run loop" in line]
    assert warnings == [
        "pcihole: the C run loop is not available (no C compiler ('no-such-cc' not found; install gcc) "
        "to build run_loop.c): using the Python loop"
    ]
    assert '"mmio_read": 8124' in proc.stdout


def test_the_c_loop_is_refused_on_the_model_which_has_no_kvm_run():
    kernel, name = default_kernel()
    with pytest.raises(Exception, match="the model backend has none"):
        build_machine(load_default(), backend="model", kernel=kernel, kernel_name=name, run_loop="c")


def test_the_run_loop_hands_the_c_loop_only_a_vcpu_that_can_run_it():
    assert issubclass(KvmVcpu, AnsweringVcpu) and not issubclass(ModelVcpu, AnsweringVcpu)
    vm = open_backend("model").create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        # The loop is only kept by the table: the refusal comes before anything would call it.
        fill_pages = FillPages(None, [(0xE000_0000, 1 << 20, 0xFF)], lambda reads: None)
        with pytest.raises(TypeError, match="the C run loop needs a kvm vCPU, not a ModelVcpu"):
            run_until_stop(vcpu, ExitHandler(None, None, None), fill_pages=fill_pages)
    finally:
        vm.close()


# --- the scan guest: the same with either loop ------------------------------------------------------


def count_python_ecam_reads(m) -> list[int]:
    """Wrap each ECAM window's read: how many ECAM reads reached Python."""
    count = [0]
    for segment in m.host_bridge.segments:
        window = m.mmio.find(segment.window_base)

        def read(addr, size, _read=window.read):
            count[0] += 1
            return _read(addr, size)

        window.read = read
    return count


def counts(stats) -> dict:
    """RunStats as a dict, with port 0x3f8's exits and coalesced writes summed: whether a console
    write exits or waits in the coalesced ring depends on when the ring was last drained (a full
    ring makes writes exit again; the flush kicker drains it every 20 ms), a matter of timing that
    either loop has."""
    d = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats) if not f.name.startswith("_")}
    d["ecam_absent_accesses"] = stats.ecam_absent_accesses  # with the C loop's deferred reads added
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    d["exits"] = {**stats.exits.as_dict(), "other": stats.exits.other}
    exited = d["io_by_port"].pop(COM1_BASE, 0)
    d["exits"]["io"] -= exited
    d["exits"]["total"] -= exited
    d["com1_accesses"] = exited + d["io_coalesced_by_port"].pop(COM1_BASE, 0)
    return d


def count_c_loop_returns(m) -> Counter[str]:
    """Wrap the vCPU's C loop: the exits it handed back to Python, by kind (its returns to hand
    over a full log are inside run_answering, and not exits)."""
    returns: Counter[str] = Counter()
    run_answering = m.vcpu.run_answering

    def counted(fill_pages):
        exit_ = run_answering(fill_pages)
        returns[type(exit_).__name__] += 1
        return exit_

    m.vcpu.run_answering = counted
    return returns


def scan(spec, strategy: str, run_loop: str):
    kernel, name = default_kernel()
    with build_machine(
        spec, backend="kvm", strategy=strategy, kernel=kernel, kernel_name=name, run_loop=run_loop
    ) as m:
        assert m.run_loop == run_loop
        python_reads = count_python_ecam_reads(m)
        returns = count_c_loop_returns(m)
        result = m.run(timeout=120)
        assert result.stop.reason == StopReason.DEBUG_EXIT and result.stop.status == 0, result.stop
        return result, m.host_bridge.stats, python_reads[0], returns


@needs_kvm
@pytest.mark.parametrize("strategy", STRATEGIES_BY_BACKEND["kvm"])
@pytest.mark.parametrize("machine_file", ["default", "examples/many-segments.toml"])
def test_the_scan_finds_the_same_devices_with_the_same_counts_through_either_loop(machine_file, strategy):
    spec = load_default() if machine_file == "default" else load(ROOT / machine_file)
    (py, py_bridge, py_reads, _), (c, c_bridge, c_reads, c_returns) = (
        scan(spec, strategy, loop) for loop in LOOPS
    )
    assert [device_json(d) for d in c.devices] == [device_json(d) for d in py.devices]
    assert len(c.devices) == len(list(spec.topology.functions()))
    # exits by kind, ECAM counts, ecam_absent_accesses address by address
    assert counts(c.stats) == counts(py.stats)
    assert c.memory.exits == py.memory.exits  # the memory map's view: hole reads, ...
    assert c_bridge == py_bridge  # the host bridge saw the same reads of present functions
    assert py_reads == py.stats.ecam_reads
    # The C loop's mirrors are the host bridge's, never the guest's: the same memslots and hole
    # backing as the Python loop's (which has no mirrors under `exit`).
    kernel_side = ("memslots", "hole_memslots", "hole_backing_bytes", "hole_mappings", "coalesced_zones")
    assert [getattr(c.memory, k) for k in kernel_side] == [getattr(py.memory, k) for k in kernel_side]
    if strategy == "exit":
        # Every config read exits: of absent functions and of present ones.
        assert py.stats.ecam_absent_exits == sum(py.stats.ecam_absent_accesses.values()) > 1000
        assert py.stats.ecam_reads - py.stats.ecam_absent_exits >= len(c.devices)
    # The C loop answered every ECAM read that exited, the present functions' too: it handed back
    # to Python only the port I/O exits (the report, the debug exit) and kicks (the console flush).
    assert c_reads == 0
    assert c_returns["MmioRead"] == c_returns["MmioWrite"] == 0
    assert sum(c_returns.values()) - c_returns["Interrupted"] == c.stats.exits.io + c.stats.exits.other


# --- guests of their own ---------------------------------------------------------------------------

ECAM = 0xE0000000
RESULTS = 0x200000
HOTPLUG_PORT = 0x90
ADDED = Bdf(0, 0, 3, 0)
ADDED_PAGE = ECAM + (3 << 15)
FILL = 0x5A
MACHINE = f"""
[machine]
ram_mib = 8

[[segment]]
id = 0
ecam_base = {ECAM:#x}
buses = "0-15"
fill = {FILL:#x}
writes = "exit"

[[endpoint]]
bdf = "0000:00:01.0"
vendor = 0x1af4
device = 0x1041
class = 0x020000
"""
ADDED_SPEC = EndpointSpec(bdf=ADDED, vendor=0x8086, device=0x10D3, class_code=0x020000)


def exit_machine(source: str, run_loop: str):
    """MACHINE on kvm with the `exit` strategy, running the assembly `source`, through `run_loop`."""
    return machine(MACHINE, "kvm", "exit", pvh_kernel_from_asm(source), run_loop=run_loop)


class HotplugPort:
    """Port HOTPLUG_PORT: each write adds ADDED or removes it, in turn."""

    def __init__(self, m) -> None:
        self.m = m

    def read(self, addr: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, addr: int, data: bytes) -> None:
        if self.m.host_bridge.page_present(ADDED_PAGE):
            self.m.host_bridge.remove_function(ADDED)
        else:
            self.m.host_bridge.add_function(ADDED_SPEC)


HOTPLUG_GUEST = f"""
    mov ${RESULTS}, %edi
    mov ${ADDED_PAGE}, %esi
    mov (%esi), %eax          # absent: the fill
    mov %eax, 0(%edi)
    out %al, ${HOTPLUG_PORT}  # the host adds the function
    mov (%esi), %eax          # present: its vendor and device
    mov %eax, 4(%edi)
    out %al, ${HOTPLUG_PORT}  # the host removes it
    mov (%esi), %eax          # absent again
    mov %eax, 8(%edi)
    movw 0xffe(%esi), %ax     # two bytes at the end of the absent page
    mov %eax, 12(%edi)
    mov $0, %al
    out %al, $0xf4
    hlt
"""


@needs_kvm
@pytest.mark.parametrize("run_loop", LOOPS)
def test_a_function_hot_added_and_removed_is_answered_at_once(run_loop):
    with exit_machine(HOTPLUG_GUEST, run_loop) as m:
        m.pio.insert(HotplugPort(m), HOTPLUG_PORT, 1, "hot-plug")
        python_reads = count_python_ecam_reads(m)
        result = m.run(timeout=60)
        assert result.stop.reason == StopReason.DEBUG_EXIT, result.stop
        seen = struct.unpack("<4I", m.memory.read_guest(RESULTS, 16))
        fill32 = int.from_bytes(bytes([FILL]) * 4, "little")
        assert seen[:3] == (fill32, 0x10D3_8086, fill32)
        assert seen[3] & 0xFFFF == fill32 & 0xFFFF
        stats = result.stats
        assert dict(stats.ecam_absent_accesses) == {
            (ADDED_PAGE, 4, "read"): 2,
            (ADDED_PAGE + 0xFFE, 2, "read"): 1,
        }
        assert (stats.exits.mmio_read, stats.ecam_reads, stats.ecam_absent_exits) == (4, 4, 3)
        # With the C loop no read reached Python: the present function's came from its mirror page.
        assert python_reads[0] == (0 if run_loop == "c" else 4)
        assert m.host_bridge.stats.config_reads == 1  # that read, counted as the Python path counts it


STRADDLE_GUEST = f"""
    mov {ECAM + 0x8000 - 2}, %eax     # the last two bytes of 00:00.7 (absent), the first two of 00:01.0
    mov %eax, {RESULTS}
    mov $0, %al
    out %al, $0xf4
    hlt
"""


@needs_kvm
@pytest.mark.parametrize("run_loop", LOOPS)
def test_a_read_straddling_an_absent_and_a_present_function_gets_each_byte_right(run_loop):
    with exit_machine(STRADDLE_GUEST, run_loop) as m:
        result = m.run(timeout=60)
        assert result.stop.reason == StopReason.DEBUG_EXIT, result.stop
        assert m.memory.read_guest(RESULTS, 4) == bytes([FILL]) * 2 + m.host_bridge.mmio_read(
            ECAM + 0x8000, 2
        )
        # KVM cuts an access that crosses a page into one exit per page (emulator_read_write).
        assert dict(result.stats.ecam_absent_accesses) == {(ECAM + 0x7FFE, 2, "read"): 1}
        assert result.stats.ecam_reads == 2


CONSOLE_THEN_ECAM = f"""
    mov $0x3f8, %dx
    mov $'a', %al
    out %al, %dx              # coalesced: waits in the ring
    mov {ECAM + 0x2000}, %eax # absent: the ring holds an entry, so Python drains it and answers
    mov {ECAM + 0x3000}, %eax # absent, ring empty: the C loop answers
    mov {ECAM + 0x4000}, %eax
    mov $0, %al
    out %al, $0xf4
    hlt
"""


@needs_kvm
@pytest.mark.parametrize("run_loop", LOOPS)
def test_an_exit_that_finds_the_coalesced_ring_holding_writes_goes_to_python(run_loop):
    with exit_machine(CONSOLE_THEN_ECAM, run_loop) as m:
        assert m.console_coalesced
        python_reads = count_python_ecam_reads(m)
        # run_until_stop without the ring-flush kicker, so that only exits drain the ring.
        handler = ExitHandler(m.mmio, m.pio, m.stats)
        stop = run_until_stop(m.vcpu, handler, timeout=60, on_coalesced=m._coalesced, fill_pages=m.fill_pages)
        assert stop.reason == StopReason.DEBUG_EXIT, stop
        assert m.serial.text() == "a" and m.stats.io_coalesced_by_port[0x3F8] == 1
        assert m.stats.ecam_absent_exits == 3
        assert python_reads[0] == (1 if run_loop == "c" else 3)


SPIN_ON_ABSENT = f"""
    mov $0x3f8, %dx
    mov $'R', %al
    out %al, %dx
    mov ${ECAM + 0x7000}, %esi
1:  mov (%esi), %eax
    jmp 1b
"""


def spinning_machine(run_loop: str):
    return exit_machine(SPIN_ON_ABSENT, run_loop)


@needs_kvm
@pytest.mark.parametrize("run_loop", LOOPS)
def test_a_guest_spinning_on_absent_reads_is_stopped_by_the_timeout(run_loop):
    with spinning_machine(run_loop) as m:
        result = m.run(timeout=0.5)
        assert result.stop.reason == StopReason.TIMEOUT, result.stop
        reads = result.stats.ecam_absent_accesses[(ECAM + 0x7000, 4, "read")]
        assert reads == result.stats.exits.mmio_read == result.stats.ecam_absent_exits > 0


@needs_kvm
@pytest.mark.parametrize("run_loop", LOOPS)
def test_a_stop_requested_from_another_thread_kicks_the_c_loop_out(run_loop):
    with spinning_machine(run_loop) as m:
        stops = StopRequest()
        asked = Stop(StopReason.SIGNAL, 2, "asked")
        ended = threading.Event()

        def ask_once_the_guest_runs() -> None:
            # Its 'R' (coalesced, drained by the flush kicker) is on the console: it is past the OUT and
            # into its loop. An ordering, not a measurement; the wait only bounds a guest that never ran.
            for _ in range(6000):
                if "R" in m.serial.text() or ended.is_set():
                    break
                time.sleep(0.01)
            stops.request(asked)

        asker = threading.Thread(target=ask_once_the_guest_runs)
        asker.start()
        try:
            result = m.run(timeout=60, stops=stops)
        finally:
            ended.set()
            asker.join()
        assert result.stop == asked
        assert result.stats.ecam_absent_exits == result.stats.exits.mmio_read > 0


@needs_kvm
def test_a_kick_before_run_makes_the_c_loop_return_at_once():
    """immediate_exit: a kick that lands before KVM_RUN (api.rst, KVM_CAP_IMMEDIATE_EXIT)."""
    with spinning_machine("c") as m:
        m.vcpu.kick()
        exit_ = m.vcpu.run_answering(m.fill_pages)
        assert type(exit_).__name__ == "Interrupted"
        assert m.stats.exits.total == 0  # the guest never ran


# --- present functions' reads from the mirror: the same bytes as Python's, after writes too -----------

PORT_PAGE = ECAM + (2 << 15)  # 00:02.0, a root port over bus 1 with a hot-plug slot
EP_PAGE = ECAM + (1 << 15)  # 00:01.0, an endpoint with a 64-bit BAR 0
BELOW_PAGE = ECAM + (1 << 20)  # 01:00.0, absent until the guest asks for it
AER_UNCOR_STATUS = 0x104  # the root port's AER capability is at 0x100 (root_port.py)
PRESENT_MACHINE = f"""
[machine]
ram_mib = 8

[[segment]]
id = 0
ecam_base = {ECAM:#x}
buses = "0-15"
fill = {FILL:#x}
writes = "trap"

[[endpoint]]
bdf = "0000:00:01.0"
vendor = 0x1af4
device = 0x1041
class = 0x020000
[[endpoint.bar]]
index = 0
type = "mem64"
size = 0x4000

[[root_port]]
bdf = "0000:00:02.0"
secondary = 1
subordinate = 1
"""
BELOW_SPEC = EndpointSpec(bdf=Bdf(0, 1, 0, 0), vendor=0x8086, device=0x10D3, class_code=0x020000)
DUMPS = 0x8000  # bytes of results: eight 4 KiB areas


class HotplugBelowPort:
    """Port HOTPLUG_PORT: each write adds 01:00.0 below the root port or removes it, in turn."""

    def __init__(self, m) -> None:
        self.m = m

    def read(self, addr: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, addr: int, data: bytes) -> None:
        if self.m.host_bridge.page_present(BELOW_PAGE):
            self.m.host_bridge.remove_function(BELOW_SPEC.bdf)
        else:
            self.m.host_bridge.add_function(BELOW_SPEC)


def dump(page: int, area: int) -> str:
    """Guest code: the 4 KiB config page at `page`, read dword by dword, into results area `area`."""
    return f"""
    mov ${page}, %esi
    mov ${RESULTS + area * 0x1000}, %edi
    xor %ecx, %ecx
1:  mov (%esi,%ecx,4), %eax
    mov %eax, (%edi,%ecx,4)
    inc %ecx
    cmp $1024, %ecx
    jne 1b
"""


PRESENT_GUEST = f"""
    {dump(EP_PAGE, 0)}
    # reads of 1, 2 and 4 bytes at unaligned offsets, and at the end of the page
    mov ${EP_PAGE}, %esi
    mov ${RESULTS + 0x1000}, %edi
    movb 0x3(%esi), %al
    mov %al, 0(%edi)
    movw 0x1(%esi), %ax
    mov %ax, 2(%edi)
    mov 0x2(%esi), %eax
    mov %eax, 4(%edi)
    mov 0xffc(%esi), %eax
    mov %eax, 8(%edi)
    movw 0xfff(%esi), %ax     # crosses into 00:01.1 (absent): one exit per page
    mov %ax, 12(%edi)
    # BAR sizing (PCI 3.0 6.2.5.1): all-ones into both halves of the 64-bit BAR 0, read back
    movl $0xffffffff, 0x10(%esi)
    movl $0xffffffff, 0x14(%esi)
    mov 0x10(%esi), %eax
    mov %eax, 16(%edi)
    mov 0x14(%esi), %eax
    mov %eax, 20(%edi)
    movl $0xfebf0000, 0x10(%esi)  # an address, read back
    movl $0, 0x14(%esi)
    mov 0x10(%esi), %eax
    mov %eax, 24(%edi)
    # A write to an absent function below the root port: trapped, the port logs the Unsupported
    # Request (Secondary Status Received Master Abort, AER UR status: RW1C bits); read them...
    movl $0, {BELOW_PAGE + 0x10}
    {dump(PORT_PAGE, 2)}
    # ...clear them by writing ones (RW1C), read again
    mov ${PORT_PAGE}, %esi
    movw $0xffff, 0x1e(%esi)
    movl $0xffffffff, {AER_UNCOR_STATUS}(%esi)
    {dump(PORT_PAGE, 3)}
    # hot-add 01:00.0 in the port's slot: its page and the port's slot status
    out %al, ${HOTPLUG_PORT}
    {dump(BELOW_PAGE, 4)}
    {dump(PORT_PAGE, 5)}
    # hot-remove it: its page reads as the fill again, the port's slot status says so
    out %al, ${HOTPLUG_PORT}
    {dump(BELOW_PAGE, 6)}
    {dump(PORT_PAGE, 7)}
    mov $0, %al
    out %al, $0xf4
    hlt
"""


def run_present_guest(run_loop: str):
    with machine(PRESENT_MACHINE, "kvm", "exit", pvh_kernel_from_asm(PRESENT_GUEST), run_loop=run_loop) as m:
        m.pio.insert(HotplugBelowPort(m), HOTPLUG_PORT, 1, "hot-plug")
        python_reads = count_python_ecam_reads(m)
        returns = count_c_loop_returns(m) if run_loop == "c" else Counter()
        result = m.run(timeout=120)
        assert result.stop.reason == StopReason.DEBUG_EXIT and result.stop.status == 0, result.stop
        return m.memory.read_guest(RESULTS, DUMPS), result, m.host_bridge.stats, python_reads[0], returns


@needs_kvm
def test_present_functions_read_the_same_through_the_c_loop_after_writes_rw1c_and_hot_plug():
    (py_seen, py, py_bridge, py_reads, _), (c_seen, c, c_bridge, c_reads, c_returns) = (
        run_present_guest(loop) for loop in LOOPS
    )
    areas = [c_seen[i : i + 0x1000] for i in range(0, DUMPS, 0x1000)]
    assert areas == [py_seen[i : i + 0x1000] for i in range(0, DUMPS, 0x1000)]
    # What the Python loop (the reference) read is what the host bridge models:
    endpoint, odd, port_logged, port_cleared, below, port_added, gone, port_removed = areas
    assert endpoint[:4] == bytes.fromhex("f41a4110")  # 1af4:1041
    assert odd[0] == endpoint[3] and odd[2:4] == endpoint[1:3] and odd[4:8] == endpoint[2:6]
    assert odd[12:14] == bytes([endpoint[0xFFF], FILL])  # the absent byte is the fill
    bar_low, bar_high, bar_set = struct.unpack_from("<3I", odd, 16)
    assert (bar_low, bar_high) == (0xFFFFC004, 0xFFFFFFFF)  # the size mask, mem64 type bits
    assert bar_set == 0xFEBF0004
    sec_status = lambda page: struct.unpack_from("<H", page, 0x1E)[0]  # noqa: E731
    aer_status = lambda page: struct.unpack_from("<I", page, AER_UNCOR_STATUS)[0]  # noqa: E731
    assert sec_status(port_logged) & 0x2000 and aer_status(port_logged) & (1 << 20)  # RMA, UR
    assert not sec_status(port_cleared) & 0x2000 and not aer_status(port_cleared) & (1 << 20)
    assert below[:4] == bytes.fromhex("8680d310") and gone == bytes([FILL]) * 0x1000
    assert port_added != port_cleared and port_removed != port_added  # the slot status changed
    # ...with the same counts: exits, ECAM reads, the view's, the host bridge's
    assert counts(c.stats) == counts(py.stats)
    assert c.memory.exits == py.memory.exits
    assert c_bridge == py_bridge
    # Every read reached Python's ECAM windows with the Python loop, none with the C loop (the
    # straddling read's two halves included: KVM makes them two exits, one per page).
    assert py_reads == py.stats.ecam_reads == c.stats.ecam_reads > 7 * 1024  # seven dumps
    assert c_reads == 0
    assert c_returns["MmioRead"] == 0 and c_returns["MmioWrite"] == c.stats.exits.mmio_write > 0


READ_PRESENT_THREE_TIMES = f"""
    mov {ECAM + 0x8000}, %eax   # 00:01.0's vendor and device ids
    mov %eax, {RESULTS}
    mov {ECAM + 0x8000}, %eax
    mov %eax, {RESULTS + 4}
    mov {ECAM + 0x8000}, %eax
    mov %eax, {RESULTS + 8}
    mov $0, %al
    out %al, $0xf4
    hlt
"""


@needs_kvm
def test_a_present_read_goes_to_python_while_a_mirror_change_is_under_way_or_the_page_is_not_mirrored():
    """The seqlock's reader side (run_loop.c copy_mirrored) and the mirrored bit, one read each."""
    with exit_machine(READ_PRESENT_THREE_TIMES, "c") as m:
        fill_pages, vcpu, bridge = m.fill_pages, m.vcpu, m.host_bridge
        ids = bridge.mmio_read(ECAM + 0x8000, 4)
        reads_before = bridge.stats.config_reads  # the mmio_read just above
        fill_pages.mirror_changing()  # as a hot-plug step on another thread would
        assert vcpu.run_answering(fill_pages) == MmioRead(ECAM + 0x8000, 4)  # handed to Python
        vcpu.complete_read(ids)
        fill_pages.mirror_changed()
        fill_pages.set_mirrored(ECAM + 0x8000, False)  # as the host bridge does before a removal
        assert vcpu.run_answering(fill_pages) == MmioRead(ECAM + 0x8000, 4)
        vcpu.complete_read(ids)
        fill_pages.set_mirrored(ECAM + 0x8000, True)
        assert bridge.stats.config_reads == reads_before  # the C loop answered nothing yet
        assert type(vcpu.run_answering(fill_pages)).__name__ == "IoOut"  # the third read: in C
        assert bridge.stats.config_reads == reads_before + 1
        assert m.memory.read_guest(RESULTS, 12) == ids * 3
