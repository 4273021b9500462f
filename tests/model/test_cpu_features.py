"""Every CPU feature the model offers in KVM_GET_SUPPORTED_CPUID runs on its engine, and the ones
it leaves out do not (TCG checks its own feature words before it decodes an instruction).

One small guest per feature: it turns on what the feature needs in CR4, runs one of its
instructions and stores 1; a #UD or #GP handler stores the vector instead. Model only: this host's
KVM (PVM) cannot run several of these instructions in the guest kernel (machine/host_quirks.py
hides them), so there is nothing to compare with; the reference is the SDM's CPUID bit for each.
"""

from __future__ import annotations

import struct

import pytest

from pcihole.hv import exits
from pcihole.hv.model.cpuid import CpuidTable, supported_cpuid

from .system_guest import RESULTS, Handler, run_system_guest

EAX, EBX, ECX, EDX = range(4)
ALIGNED = 0x50000  # 64-byte aligned scratch memory (XSAVE area, CMPXCHG16B operand)
CR4_SETUP = f"""
    mov %cr4, %rax
    or ${(1 << 9) | (1 << 10) | (1 << 16) | (1 << 18)}, %rax  # OSFXSR, OSXMMEXCPT, FSGSBASE, OSXSAVE
    mov %rax, %cr4
    xor %ecx, %ecx
    mov $3, %eax
    xor %edx, %edx
    xsetbv                       # XCR0 = x87 | SSE
    mov $1, %eax
    mov $2, %ebx
"""

#: name (as /proc/cpuinfo) -> (leaf, subleaf, register, bit, instruction(s)). Bits with no
#: instruction of their own (FPU, PAE, APIC, ...) are exercised by running at all, or by CR4.
FEATURES: dict[str, tuple[int, int, int, int, str]] = {
    "sse3": (1, 0, ECX, 0, "haddps %xmm1, %xmm0"),
    "pclmulqdq": (1, 0, ECX, 1, "pclmulqdq $0, %xmm1, %xmm0"),
    "ssse3": (1, 0, ECX, 9, "pshufb %xmm1, %xmm0"),
    "cx16": (1, 0, ECX, 13, f"cmpxchg16b {ALIGNED}"),
    "sse4_1": (1, 0, ECX, 19, "pblendw $1, %xmm1, %xmm0"),
    "sse4_2": (1, 0, ECX, 20, "crc32l %eax, %ebx"),
    "movbe": (1, 0, ECX, 22, f"movbe {ALIGNED}, %eax"),
    "popcnt": (1, 0, ECX, 23, "popcnt %eax, %ebx"),
    "aes": (1, 0, ECX, 25, "aesenc %xmm1, %xmm0"),
    "xsave": (1, 0, ECX, 26, f"xor %ecx, %ecx\n xgetbv\n xsave {ALIGNED}\n xrstor {ALIGNED}"),
    "rdrand": (1, 0, ECX, 30, "rdrand %eax"),
    "mmx": (1, 0, EDX, 23, "paddd %mm1, %mm0\n emms"),
    "fxsr": (1, 0, EDX, 24, f"fxsave {ALIGNED}\n fxrstor {ALIGNED}"),
    "sse2": (1, 0, EDX, 26, "paddq %xmm1, %xmm0"),
    "clflush": (1, 0, EDX, 19, f"clflush {ALIGNED}"),
    "cmov": (1, 0, EDX, 15, "cmove %eax, %ebx"),
    "cx8": (1, 0, EDX, 8, f"cmpxchg8b {ALIGNED}"),
    "fsgsbase": (7, 0, EBX, 0, "rdfsbase %rax\n wrgsbase %rax"),
    "bmi1": (7, 0, EBX, 3, "andn %eax, %ebx, %ecx"),
    "bmi2": (7, 0, EBX, 8, "pdep %eax, %ebx, %ecx"),
    "adx": (7, 0, EBX, 19, "adcx %eax, %ebx\n adox %eax, %ebx"),
    "smap": (7, 0, EBX, 20, "stac\n clac"),
    "lahf_lm": (0x80000001, 0, ECX, 0, "lahf\n sahf"),
    "abm": (0x80000001, 0, ECX, 5, "lzcnt %eax, %ebx\n cmp $31, %ebx\n jne .+4\n nop"),
    "rdtscp": (0x80000001, 0, EDX, 27, "rdtscp"),
    "xsaveopt": (0xD, 1, EAX, 0, f"xor %edx, %edx\n mov $3, %eax\n xsaveopt {ALIGNED}"),
}

#: Features the model does not offer, and an instruction of each that the engine refuses. (Not
#: every left-out feature is refused: the engine accepts CR4.PCIDE, which QEMU 5.0 does not check,
#: and decodes RDSEED; the model leaves them out because Unicorn's CPU model does not list them.)
ABSENT: dict[str, tuple[int, int, int, int, str]] = {
    "avx": (1, 0, ECX, 28, "vaddps %ymm1, %ymm2, %ymm3"),
    "invpcid": (7, 0, EBX, 10, f"xor %eax, %eax\n invpcid {ALIGNED}, %rax"),
    "xsavec": (0xD, 1, EAX, 1, f"xsavec {ALIGNED}"),
}

UD, GP = 6, 13
FAULT = "movq ${vector}, {out}\n hlt"


def run_feature(hv, asm: str) -> tuple[int, int]:
    body = CR4_SETUP + asm + f"\n movq $1, {RESULTS}\n"
    handlers = [
        Handler(UD, FAULT.format(vector=UD, out=RESULTS + 8)),
        Handler(GP, FAULT.format(vector=GP, out=RESULTS + 8)),
    ]
    run = run_system_guest(hv, body, handlers)
    assert run.exits[-1] == exits.Hlt()
    done, fault = struct.unpack_from("<QQ", run.results)
    return done, fault


def offered(leaf: int, sub: int, reg: int, bit: int) -> bool:
    return bool(CpuidTable.from_cpuid2(supported_cpuid()).lookup(leaf, sub)[reg] & (1 << bit))


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_offered_feature_runs(name, model_hv):
    leaf, sub, reg, bit, asm = FEATURES[name]
    assert offered(leaf, sub, reg, bit), f"{name} is not offered"
    assert run_feature(model_hv, asm) == (1, 0)


@pytest.mark.parametrize("name", sorted(ABSENT))
def test_feature_left_out_does_not_run(name, model_hv):
    leaf, sub, reg, bit, asm = ABSENT[name]
    assert not offered(leaf, sub, reg, bit), f"{name} is offered"
    done, fault = run_feature(model_hv, asm)
    assert done == 0 and fault in (UD, GP)


def test_every_instruction_feature_offered_is_measured():
    """Leaf 1 ECX, leaf 7 EBX, 0x80000001 ECX and 0xd.1 EAX hold instruction features: each bit
    offered is in FEATURES, or is one of the few with no instruction to run."""
    table = CpuidTable.from_cpuid2(supported_cpuid())
    measured = {(f[0], f[1], f[2], f[3]) for f in FEATURES.values()}
    # hypervisor, OSXSAVE, ERMS (a speed hint), SMEP (CR4.SMEP: the test guest's pages are all user
    # pages, so turning it on would fault its own code); x2APIC and the TSC-deadline timer are the
    # local APIC's (tests/model/test_differential_lapic.py runs both)
    no_instruction = {
        (1, 0, ECX, 31), (1, 0, ECX, 27), (7, 0, EBX, 9), (7, 0, EBX, 7), (1, 0, ECX, 21), (1, 0, ECX, 24)
    }  # fmt: skip
    for leaf, sub, reg in ((1, 0, ECX), (7, 0, EBX), (0x80000001, 0, ECX), (0xD, 1, EAX)):
        value = table.lookup(leaf, sub)[reg]
        for bit in range(32):
            if value & (1 << bit):
                key = (leaf, sub, reg, bit)
                assert key in measured or key in no_instruction, f"CPUID {leaf:#x}.{sub} reg {reg} bit {bit}"
