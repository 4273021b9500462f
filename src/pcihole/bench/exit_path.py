"""What one exit through pcihole costs, against the least any Python VMM can do per exit.

The floor is a bare loop: a tiny guest reads a 4-byte MMIO address with no memslot N times, and the
host only re-enters KVM_RUN, completing each read with a constant (no bus, no memory map, no stats).
The guest times itself with the TSC, and runs the same loop over RAM as a baseline, so

    bare ticks per exit = (ticks of N MMIO reads - ticks of N RAM reads) / N.

pcihole's cost per dispatched exit comes from the scan table, the same way: the `exit` strategy's scan
against the same scan with every hole backed by memory (`ro-filled`, no exit for absent functions),
divided by the extra ECAM exits. Their ratio is what pcihole's dispatch in Python adds to each exit.
"""

from __future__ import annotations

import statistics
import struct
from dataclasses import asdict, dataclass

from pcihole.bench.errors import BenchError
from pcihole.bench.scan import ScanRow
from pcihole.host.mman import HostMapping
from pcihole.host.tsc import TscClock
from pcihole.hv import open_backend
from pcihole.hv.exits import IoOut, MmioRead
from pcihole.hv.uapi import KvmCap
from pcihole.hv.x86_cpu_state import enter_protected_mode_flat

RAM_SIZE = 0x10000
CODE_GPA = 0x1000
RESULT_GPA = 0x2000  # u64: TSC ticks the loop took
RAM_TARGET_GPA = 0x3000
#: No memslot here: every read exits (the default machine's ECAM base, for familiarity).
MMIO_TARGET_GPA = 0xE0000000
DONE_PORT = 0xF4
FILL = b"\xff" * 8

# 32-bit flat protected mode; ECX = reads, ESI = the address read. Assembled by hand (as small as it
# is, listed here so it can be checked against `as --32`):
LOOP_GUEST = bytes.fromhex(
    "0f31"          # rdtsc                 ; edx:eax = start
    "89c7"          # mov   edi, eax
    "89d5"          # mov   ebp, edx
    "8b06"          # 1: mov eax, [esi]     ; the read being measured
    "49"            # dec   ecx
    "75fb"          # jnz   1b
    "0f31"          # rdtsc
    "29f8"          # sub   eax, edi
    "19ea"          # sbb   edx, ebp        ; edx:eax = ticks
    "a300200000"    # mov   [0x2000], eax
    "891504200000"  # mov   [0x2004], edx
    "e6f4"          # out   0xf4, al        ; done
    "f4"            # hlt
)  # fmt: skip


@dataclass
class ExitPathResult:
    backend: str
    reads: int
    runs: int
    bare_seconds_per_exit: float
    #: None where the scan table lacks the exit or ro-filled row of this backend
    pcihole_seconds_per_exit: float | None
    #: pcihole / bare: 1.0 would mean pcihole adds nothing to an exit
    ratio: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def loop_ticks(backend: str, reads: int, target_gpa: int) -> int:
    """Run the loop guest once on a fresh VM; the TSC ticks of its `reads` reads of `target_gpa`."""
    hv = open_backend(backend)
    vm = vcpu = ram = None
    try:
        vm = hv.create_vm()
        ram = HostMapping.anonymous(RAM_SIZE, name="exit-path guest RAM")
        ram.write(CODE_GPA, LOOP_GUEST)
        vm.set_user_memory_region(0, 0, 0, RAM_SIZE, ram.addr)
        vcpu = vm.create_vcpu(0)
        if hv.check_extension(KvmCap.KVM_CAP_EXT_CPUID):
            vcpu.set_cpuid2(hv.get_supported_cpuid())
        enter_protected_mode_flat(vcpu, CODE_GPA)
        regs = vcpu.get_regs()
        regs.rcx, regs.rsi = reads, target_gpa
        vcpu.set_regs(regs)
        while True:  # the bare loop: nothing between two KVM_RUNs but completing the read
            exit_ = vcpu.run()
            if type(exit_) is MmioRead:
                vcpu.complete_read(FILL[: exit_.size])
                continue
            if type(exit_) is IoOut and exit_.port == DONE_PORT:
                break
            raise BenchError(f"exit-path guest on {backend}: unexpected exit {exit_}")
        return struct.unpack("<Q", ram.read(RESULT_GPA, 8))[0]
    finally:
        if vcpu is not None:
            vcpu.close()
        if vm is not None:
            vm.close()
        if ram is not None:
            ram.close()
        hv.close()


def dispatched_seconds_per_exit(rows: list[ScanRow], backend: str) -> float | None:
    by_strategy = {r.strategy: r for r in rows if r.backend == backend}
    exit_row, floor_row = by_strategy.get("exit"), by_strategy.get("ro-filled")
    if exit_row is None or floor_row is None or exit_row.ecam_exits is None or floor_row.ecam_exits is None:
        return None
    extra_exits = exit_row.ecam_exits - floor_row.ecam_exits
    if extra_exits <= 0:
        return None
    return (exit_row.scan_seconds.median - floor_row.scan_seconds.median) / extra_exits


def measure_exit_path(
    backend: str, reads: int, runs: int, rows: list[ScanRow], clock: TscClock
) -> ExitPathResult:
    # Medians over several VMs, as the scan rows it is compared with are medians over several boots.
    mmio = statistics.median(loop_ticks(backend, reads, MMIO_TARGET_GPA) for _ in range(runs))
    ram = statistics.median(loop_ticks(backend, reads, RAM_TARGET_GPA) for _ in range(runs))
    bare = clock.seconds(round(max(mmio - ram, 0))) / reads
    pcihole = dispatched_seconds_per_exit(rows, backend)
    return ExitPathResult(
        backend=backend,
        reads=reads,
        runs=runs,
        bare_seconds_per_exit=bare,
        pcihole_seconds_per_exit=pcihole,
        ratio=pcihole / bare if pcihole is not None and bare > 0 else None,
    )
