"""Host quirks: what pcihole does differently on a host whose KVM cannot run a stock guest kernel.

One switch, `--host-quirks auto|none|pvm`:
- `none`: a VMM as on hardware KVM. A KVM internal error ends the run with one line quoting it.
- `pvm`: the workarounds below, for PVM (a software KVM, module `kvm_pvm`: no VMX/SVM; the guest
  kernel runs in hardware ring 3 and privileged or unusual instructions go through KVM's instruction
  emulator, which fails on some of them with KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION).
- `auto` (the default): `pvm` where /sys/module/kvm_pvm exists and the backend is kvm, else `none`.
  The module's presence is the reliable sign: KVM_GET_SUPPORTED_CPUID reports the same "KVMKVMKVM"
  signature as on hardware, and the host CPU flags show "hypervisor" on any cloud VM.

The quirks, each needed on PVM only:
1. `int3` (cc) stops the emulator. Linux uses int3 on purpose: text_poke_bp() patches live code
   through a breakpoint and the alternatives self-test executes one (int3_selftest). pcihole does what
   the CPU would: RIP += 1 (#BP is a trap), and #BP is injected with KVM_SET_VCPU_EVENTS
   (exception.injected, nr 3), so the guest's own #BP handler (do_int3) runs.
2. `fwait` (9b) stops the emulator; with no x87 exception pending it does nothing: step over it.
3. CPUID features the emulator cannot run are hidden from the guest (KVM_SET_CPUID2) *and* cleared on
   the kernel command line (clearcpuid=; 6.1 has no `noxsave` any more, clearcpuid=xsave does it), because the guest also sees host features CPUID does not
   report: SMAP (clac/stac fail), XSAVE (xgetbv/xrstor fail), FSGSBASE, PCID/INVPCID, RDRAND/RDSEED,
   CX16 (cmpxchg16b fails), POPCNT and RDTSCP, and the AVX family (SSE/AVX instructions fail).
4. `kernel_args()`: those clearcpuid= names, plus nofsgsbase, and arguments that skip work
   costing minutes at ~0.3 us per emulated instruction: the tracing/IMA/EVM/certificate initcalls
   (initcall_blacklist=; tracer_init_tracefs alone takes ~160 s here), crypto self-tests, the watchdogs,
   and TSC/timer checks that a software vCPU fails by being slow.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from pcihole.hv.exits import InternalError
from pcihole.hv.uapi import (
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
)

HOST_QUIRKS_CHOICES = ("auto", "none", "pvm")
PVM_MODULE = "/sys/module/kvm_pvm"

INT3 = 0xCC
FWAIT = 0x9B
BP_VECTOR = 3
MAX_INSN_BYTES = 15

PVM_HIDDEN_FEATURES = (
    "smap",
    "xsave",
    "osxsave",
    "fsgsbase",
    "pcid",
    "invpcid",
    "rdrand",
    "rdseed",
    "cx16",
    "popcnt",
    "rdtscp",
    "rdpid",
    "avx",
    "avx2",
    "f16c",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512ifma",
)
#: Initcalls that cost minutes under PVM and that a boot to the PCI scan does not need.
PVM_SLOW_INITCALLS = (
    # trace_eval_init queues eval_map_work_func, which rewrites every trace event's format holding
    # event_mutex for minutes; init_kprobe_trace then blocks on that mutex ("task swapper/0:1 blocked
    # for more than 127 seconds").
    "trace_eval_init",
    "tracer_init_tracefs",
    "init_ima",
    "init_evm",
    "load_system_certificate_list",
    "load_uefi_certs",
)
PVM_KERNEL_ARGS = (
    "nofsgsbase",
    "mitigations=off",
    "tsc=reliable",
    "no_timer_check",
    "cryptomgr.notests",
    "nosoftlockup",
    "nowatchdog",
    "init_on_alloc=0",
)


class HostQuirksError(ValueError):
    pass


@dataclass(frozen=True)
class HostQuirks:
    name: str
    why: str = ""
    hide_features: tuple[str, ...] = ()
    fix_int3: bool = False
    step_fwait: bool = False
    kernel_args: tuple[str, ...] = field(default=())

    @property
    def active(self) -> bool:
        return self.name != "none"


NO_QUIRKS = HostQuirks("none", "asked for")


def pvm_quirks(why: str) -> HostQuirks:
    args = (
        f"clearcpuid={','.join(PVM_HIDDEN_FEATURES)}",
        *PVM_KERNEL_ARGS,
        f"initcall_blacklist={','.join(PVM_SLOW_INITCALLS)}",
    )
    return HostQuirks("pvm", why, PVM_HIDDEN_FEATURES, True, True, args)


def host_is_pvm(module_path: str = PVM_MODULE) -> bool:
    return os.path.isdir(module_path)


def choose_host_quirks(choice: str, backend: str, *, module_path: str = PVM_MODULE) -> HostQuirks:
    """The quirks for `--host-quirks choice` on `backend` ("kvm" or "model")."""
    if choice == "none":
        return NO_QUIRKS
    if choice == "pvm":
        return pvm_quirks("asked for")
    if choice == "auto":
        if backend == "kvm" and host_is_pvm(module_path):
            return pvm_quirks(f"auto: {module_path} exists (software KVM)")
        return HostQuirks(
            "none", f"auto: {'no ' + module_path if backend == 'kvm' else backend + ' backend'}"
        )
    raise HostQuirksError(f"--host-quirks {choice!r}: choose from {', '.join(HOST_QUIRKS_CHOICES)}")


def kernel_args(quirks: HostQuirks) -> list[str]:
    """Kernel command-line arguments the host needs (empty without quirks)."""
    return list(quirks.kernel_args)


# --- internal errors ----------------------------------------------------------------------------------


def reported_instruction(exit: InternalError) -> bytes | None:
    """The instruction bytes KVM put in kvm_run.emulation_failure (Linux 5.14+), if it did.

    struct { u32 suberror; u32 ndata; u64 flags; u8 insn_size; u8 insn_bytes[15]; }: the words after
    ndata are flags, then insn_size and the bytes packed little-endian.
    """
    if exit.suberror != KVM_INTERNAL_ERROR_EMULATION or len(exit.data) < 3:
        return None
    if not exit.data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return None
    packed = struct.pack("<QQ", exit.data[1], exit.data[2])
    size = min(packed[0], MAX_INSN_BYTES)
    return packed[1 : 1 + size] if size else None


def instruction_at_rip(vcpu, read_guest: Callable[[int, int], bytes]) -> tuple[int, bytes | None]:
    """(RIP, up to 15 bytes at RIP read through the guest's page tables), bytes None if unmapped."""
    regs = vcpu.get_regs()
    rip = regs.rip
    try:
        sregs = vcpu.get_sregs()
        linear = rip if sregs.efer & (1 << 10) else (sregs.cs.base + rip) & 0xFFFFFFFF
        gpa = vcpu.translate(linear) if hasattr(vcpu, "translate") else linear
        if gpa is None:
            return rip, None
        length = min(MAX_INSN_BYTES, 0x1000 - (gpa & 0xFFF))
        return rip, read_guest(gpa, length)
    except (OSError, ValueError):
        return rip, None


class InternalErrorHandler:
    """Fixes up the internal errors the quirks cover, and describes the rest in one line."""

    def __init__(self, quirks: HostQuirks, vcpu, read_guest: Callable[[int, int], bytes], stats=None) -> None:
        self.quirks = quirks
        self.vcpu = vcpu
        self.read_guest = read_guest
        self.stats = stats

    def _insn(self, exit: InternalError) -> tuple[int, bytes | None]:
        rip, at_rip = instruction_at_rip(self.vcpu, self.read_guest)
        reported = reported_instruction(exit)
        return rip, reported if reported else at_rip

    def handle(self, exit: InternalError) -> bool:
        """True if the error was fixed up and the guest can run on."""
        if not self.quirks.active or exit.suberror != KVM_INTERNAL_ERROR_EMULATION:
            return False
        rip, insn = self._insn(exit)
        if not insn:
            return False
        if insn[0] == INT3 and self.quirks.fix_int3:
            regs = self.vcpu.get_regs()
            regs.rip = rip + 1
            self.vcpu.set_regs(regs)
            events = self.vcpu.get_vcpu_events()
            events.exception.injected = 1
            events.exception.nr = BP_VECTOR
            events.exception.has_error_code = 0
            events.exception.error_code = 0
            events.flags = 0
            self.vcpu.set_vcpu_events(events)
            self._count("int3")
            return True
        if insn[0] == FWAIT and self.quirks.step_fwait:
            regs = self.vcpu.get_regs()
            regs.rip = rip + 1
            self.vcpu.set_regs(regs)
            self._count("fwait")
            return True
        return False

    def _count(self, kind: str) -> None:
        if self.stats is not None:
            self.stats.quirk_fixups_by_kind[kind] += 1

    def describe(self, exit: InternalError) -> str:
        """One line: the suberror, RIP and the instruction bytes, and what the quirks switch says."""
        kind = {1: "emulation failure", 2: "simultaneous exceptions", 3: "event delivery failure"}.get(
            exit.suberror, "unknown"
        )
        try:
            rip, insn = self._insn(exit)
            where = f" at RIP {rip:#x}"
        except OSError:
            insn, where = reported_instruction(exit), ""
        text = f"KVM internal error: {kind} (suberror {exit.suberror}){where}"
        text += f", instruction bytes {insn.hex(' ')}" if insn else ", instruction bytes unknown"
        if not self.quirks.active:
            text += " (a software KVM such as PVM cannot emulate this; try --host-quirks pvm)"
        return text
