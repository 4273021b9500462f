"""`pcihole linux fetch` and `pcihole run --linux` through the real command line (`python -m pcihole.cli`
in a subprocess): what they print, their one-line errors and exit statuses.

The full `run --linux` boot takes seconds on hardware KVM but about ten minutes on a software KVM
(PVM); here it runs only on hardware KVM or with PCIHOLE_LINUX_BOOT=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcihole.bench.host import hardware_kvm
from pcihole.hv import kvm_available
from pcihole.linux.fetch import LinuxFetchError, fetch_busybox, fetch_kernel
from pcihole.machine.machinefile import load_default
from tests.linux.boot_pool import CliBoot

ROOT = Path(__file__).resolve().parents[2]


def pcihole(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pcihole.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def one_error(proc, status: int) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcihole: error: "), proc.stderr
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def cached():
    try:
        return fetch_kernel(), fetch_busybox()
    except LinuxFetchError as e:
        pytest.skip(f"the Debian kernel cannot be fetched here: {e}")


def test_linux_fetch_prints_the_cached_files(cached):
    proc = pcihole("linux", "fetch")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["kernel", "busybox"]
    paths = [Path(ln.split()[1]) for ln in lines]
    assert paths == list(cached)
    assert all(p.is_file() for p in paths)


def test_linux_and_kernel_together_is_bad_input(tmp_path):
    line = one_error(pcihole("run", "--linux", "--kernel", str(tmp_path / "vmlinux")), 2)
    assert "--linux" in line and "--kernel" in line


def test_linux_without_apt_is_one_line(tmp_path):
    """An empty cache and no apt on PATH: the host cannot give the kernel, exit 1 before any guest."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": str(tmp_path)}
    line = one_error(pcihole("run", "--linux", env=env), 1)
    assert "apt-cache not found" in line
    line = one_error(pcihole("linux", "fetch", env=env), 1)
    assert "apt-cache not found" in line


def test_linux_timeout_is_checked_before_anything(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": str(tmp_path)}
    line = one_error(pcihole("run", "--linux", "--timeout", "0", env=env), 2)
    assert "--timeout" in line


BOOT_HERE = hardware_kvm() or os.environ.get("PCIHOLE_LINUX_BOOT") == "1"
#: The boots these tests check, run in the background from the start of the session (tests/linux/boot_pool.py).
RUN_LINUX_ON_KVM = CliBoot(("run", "--linux", "--backend", "kvm", "--strategy", "ro-alias", "--json"), "kvm")
RUN_LINUX_ON_THE_MODEL = CliBoot(
    ("run", "--linux", "--backend", "model", "--strategy", "native", "--json"), "model"
)


@pytest.mark.kvm
@pytest.mark.slow
@pytest.mark.skipif(kvm_available() is not None, reason=f"/dev/kvm: {kvm_available()}")
@pytest.mark.skipif(
    not BOOT_HERE,
    reason="a Linux boot takes ~5 min of CPU on a software KVM, and tests/linux/test_linux_boot.py "
    "boots this machine on kvm already (set PCIHOLE_LINUX_BOOT=1)",
)
@pytest.mark.linux_boot(RUN_LINUX_ON_KVM)
def test_run_linux_json_lists_the_default_machine(linux_boot):
    proc = linux_boot
    assert proc.returncode == 0, proc.tail()
    data = json.loads(proc.stdout)
    linux = data["linux"]
    assert linux.keys() >= {"devices", "boot_seconds", "ecam_reads"}
    expected = sorted(str(f.bdf) for f in load_default().topology.functions())
    assert sorted(d["bdf"] for d in linux["devices"]) == expected
    assert linux["devices"][0].keys() == data["devices"][0].keys()


def test_pvm_quirks_on_the_model_are_refused_before_anything(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": str(tmp_path)}
    line = one_error(pcihole("run", "--linux", "--backend", "model", "--host-quirks", "pvm", env=env), 2)
    assert "--host-quirks pvm" in line and "model" in line


@pytest.mark.slow
@pytest.mark.linux_boot(RUN_LINUX_ON_THE_MODEL)
def test_run_linux_on_the_model_lists_the_default_machine_from_init(linux_boot):
    """`pcihole run --linux --backend model --strategy native --json`: the seed's KVM_MEM_PCI_HOLE
    slots; user space runs on the model, so the list is /init's (sysfs), and it is the file's."""
    proc = linux_boot
    assert proc.returncode == 0, proc.tail()
    data = json.loads(proc.stdout)
    linux = data["linux"]
    assert (linux["source"], linux["reached_init"], linux["powered_off"]) == ("initramfs", True, True)
    expected = sorted(str(f.bdf) for f in load_default().topology.functions())
    assert sorted(d["bdf"] for d in linux["devices"]) == expected
    assert linux["ecam_absent_exits"] == 0
    assert linux["boot_seconds"] is not None and linux["boot_seconds"] > 0
