"""What machine the numbers came from: CPU, kernel, which KVM, which QEMU."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

from pcihole.hv.model.engine import loaded_engine

#: KVM vendor modules and what they mean for the numbers.
KVM_MODULES = {
    "kvm_intel": "kvm_intel (hardware VT-x)",
    "kvm_amd": "kvm_amd (hardware AMD-V)",
    "kvm_pvm": "kvm_pvm (software-based PVM: no VT-x/AMD-V; guest instructions and exits are slow)",
}


@dataclass(frozen=True)
class HostInfo:
    cpu_model: str
    cpus: int
    kernel: str
    kvm_flavour: str
    python: str
    qemu: str | None
    #: the 1-minute load average when the run started and when it ended (os.getloadavg): above the
    #: CPU count, other processes were waiting for the CPUs the bench ran on, and only ratios measured
    #: side by side in this run mean much
    load_at_start: float | None = None
    load_at_end: float | None = None
    #: the model backend's CPU engine (hv/model/engine.py)
    model_engine: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kvm_flavour() -> str:
    """The loaded KVM vendor module (from /sys/module), else what the CPU flags allow."""
    loaded = [m for m in KVM_MODULES if os.path.isdir(f"/sys/module/{m}")]
    if loaded:
        return "; ".join(KVM_MODULES[m] for m in loaded)
    if not os.path.isdir("/sys/module/kvm"):
        return "none (no kvm module)"
    flags = cpu_flags()
    hardware = "vmx" in flags or "svm" in flags
    return "kvm (vendor module unknown; CPU has " + ("VT-x/AMD-V)" if hardware else "no VT-x/AMD-V)")


def hardware_kvm() -> bool:
    """True where KVM runs on VT-x or AMD-V (kvm_intel or kvm_amd loaded), not on a software KVM."""
    return any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))


def qemu_version(qemu: str | None = None) -> str | None:
    qemu = qemu or shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip().splitlines()[0] if out.strip() else None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def host_info() -> HostInfo:
    return HostInfo(
        cpu_model=cpu_model(),
        cpus=os.cpu_count() or 1,
        kernel=platform.release(),
        kvm_flavour=kvm_flavour(),
        python=platform.python_version(),
        qemu=qemu_version(),
        load_at_start=load_average(),
        model_engine=loaded_engine().describe(),
    )
