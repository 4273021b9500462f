"""Every error a user can reach gives one line on stderr, `pcihole: error: ...`, naming the file or the
thing at fault, and a non-zero exit status (2 for bad input, 1 when the guest or the host fails);
never a traceback. Through the real command line: `python -m pcihole.cli` in a subprocess.

The table in README.md "## Errors" lists the same cases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backends import BACKENDS, KVM_UNAVAILABLE
from tests.guest_runner import pvh_kernel

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def pcihole(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
    full_env = {k: v for k, v in os.environ.items() if k != "PCIHOLE_KVM_DEVICE"}
    full_env.update({"PYTHONPATH": str(SRC), **(env or {})})
    cmd = [*prefix, sys.executable, "-m", "pcihole.cli", *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def assert_one_error(proc, status: int, *words: str) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {proc.stderr!r}"
    line = lines[0]
    assert line.startswith("pcihole: error: "), line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    assert proc.returncode == status, (proc.returncode, line)
    return line


# --- machine files ----------------------------------------------------------------------------------


def test_a_machine_file_that_is_not_toml(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("[machine\nram_mib = 64\n")
    assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "invalid TOML")
    assert_one_error(pcihole("acpi", "--machine", str(f), "--out", str(tmp_path / "out")), 2, str(f))


def test_a_machine_file_with_an_unknown_key(tmp_path):
    f = tmp_path / "typo.toml"
    f.write_text('[machine]\nram_mib = 64\ncolour = "red"\n[[segment]]\nid = 0\necam_base = 0xe0000000\n')
    assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "unknown key 'colour'")


def test_a_machine_file_with_an_impossible_topology(tmp_path):
    f = tmp_path / "orphan.toml"
    f.write_text(
        "[machine]\nram_mib = 64\n[[segment]]\nid = 0\necam_base = 0xe0000000\n"
        '[[endpoint]]\nbdf = "0000:05:00.0"\nvendor = 0x1af4\ndevice = 0x1041\nclass = 0x020000\n'
    )
    assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "0000:05:00.0")


def test_a_machine_file_with_a_port_where_it_cannot_be(tmp_path):
    f = tmp_path / "port.toml"
    f.write_text(
        "[machine]\nram_mib = 64\n[[segment]]\nid = 0\necam_base = 0xe0000000\n"
        '[[downstream_port]]\nbdf = "0000:00:03.0"\nsecondary = 1\n'
    )
    line = assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "downstream port 0000:00:03.0")
    assert "must be on a switch's internal bus" in line and "not on root bus 0" in line


def test_a_machine_file_whose_ecam_overlaps_ram(tmp_path):
    f = tmp_path / "overlap.toml"
    f.write_text('[machine]\nram_mib = 64\n[[segment]]\nid = 0\necam_base = 0x0\nbuses = "0-0"\n')
    assert_one_error(pcihole("run", "--machine", str(f), "--backend", "model"), 2, "overlap")


def test_a_machine_file_that_does_not_exist(tmp_path):
    f = tmp_path / "nowhere.toml"
    assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "No such file")


# --- arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), ("required",)),
        (("run", "--bogus"), ("--bogus",)),
        (("frobnicate",), ("frobnicate",)),
        (("run", "--strategy", "fastest"), ("--strategy", "fastest")),
        (("run", "--backend", "xen"), ("--backend", "xen")),
        (("run", "--timeout", "soon"), ("--timeout", "soon")),
        (("run", "--timeout", "-1"), ("--timeout",)),
        (("acpi",), ("--out",)),
    ],
    ids=[
        "no-command",
        "unknown-option",
        "unknown-command",
        "bad-strategy",
        "bad-backend",
        "bad-timeout",
        "negative-timeout",
        "missing-out",
    ],
)
def test_bad_arguments(args, words):
    assert_one_error(pcihole(*args), 2, *words)


# --- the kvm device ---------------------------------------------------------------------------------


def test_kvm_device_missing(tmp_path):
    path = str(tmp_path / "no-kvm-here")
    env = {"PCIHOLE_KVM_DEVICE": path}
    assert_one_error(pcihole("run", "--backend", "kvm", env=env), 1, path, "does not exist")
    # auto falls back to the model, and says so on its informational line.
    proc = pcihole("run", "--backend", "auto", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert '"backend": "model"' in proc.stdout


def test_kvm_device_not_permitted(tmp_path):
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    path.chmod(0)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root opens any file: drop every capability (CAP_DAC_OVERRIDE) for the child, as a user has none.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, and setpriv (util-linux) is missing to drop CAP_DAC_OVERRIDE")
        prefix = ("setpriv", "--bounding-set=-all", "--")
    env = {"PCIHOLE_KVM_DEVICE": str(path)}
    assert_one_error(
        pcihole("run", "--backend", "kvm", env=env, prefix=prefix), 1, str(path), "no permission"
    )


def test_kvm_device_that_is_not_kvm():
    env = {"PCIHOLE_KVM_DEVICE": os.devnull}
    assert_one_error(pcihole("run", "--backend", "kvm", env=env), 1, os.devnull, "not a usable KVM device")


@pytest.mark.kvm
def test_a_strategy_the_backend_cannot_do():
    assert_one_error(pcihole("run", "--backend", "kvm", "--strategy", "native"), 2, "native", "kvm backend")
    assert_one_error(
        pcihole("run", "--backend", "kvm", "--strategy", "mmio-bus"), 2, "mmio-bus", "kvm backend"
    )


@pytest.mark.slow
def test_memslot_limit_reached(tmp_path):
    """264 one-bus segments, each with 124 functions every other page: 33000 hole runs, one memslot
    each, more than KVM_CAP_NR_MEMSLOTS (32764) allows."""
    endpoints = [
        f'{{bdf = "{s:04x}:00:{d:02x}.{f}", vendor = 0x1af4, device = 0x1041, class = 0x020000}}'
        for s in range(264)
        for d in range(1, 32)
        for f in (0, 2, 4, 6)
    ]
    segments = [
        f'[[segment]]\nid = {s}\necam_base = {0x80000000 + s * 0x200000:#x}\nbuses = "0-0"\n'
        for s in range(264)
    ]
    f = tmp_path / "huge.toml"
    f.write_text(
        "endpoint = [\n" + ",\n".join(endpoints) + "]\n[machine]\nram_mib = 64\n" + "".join(segments)
    )
    backend = "kvm" if KVM_UNAVAILABLE is None else "model"
    line = assert_one_error(
        pcihole("run", "--machine", str(f), "--backend", backend, "--strategy", "ro-alias"), 2
    )
    assert str(f) in line and "memslots" in line and "KVM_CAP_NR_MEMSLOTS" in line, line


# --- kernels ----------------------------------------------------------------------------------------


def test_a_kernel_that_is_not_an_elf(tmp_path):
    k = tmp_path / "notes.txt"
    k.write_text("not a kernel\n")
    assert_one_error(pcihole("run", "--kernel", str(k), "--backend", "model"), 2, str(k), "not an ELF")


def test_a_kernel_that_is_not_pvh(tmp_path):
    from tests.boot.elfimages import ELFCLASS32, PF_R, PF_X, PT_LOAD, Part, build

    k = tmp_path / "plain.elf"
    k.write_bytes(build([Part(PT_LOAD, 0x100000, b"\xf4", flags=PF_R | PF_X)], elf_class=ELFCLASS32).data)
    assert_one_error(pcihole("run", "--kernel", str(k), "--backend", "model"), 2, str(k), "PVH")


def test_a_kernel_that_does_not_exist(tmp_path):
    k = tmp_path / "vmlinux"
    assert_one_error(pcihole("run", "--kernel", str(k)), 2, str(k), "No such file")


def test_an_initrd_without_a_kernel(tmp_path):
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(b"x")
    assert_one_error(
        pcihole("run", "--initrd", str(initrd), "--backend", "model"), 2, "--initrd needs --kernel"
    )


def test_an_initrd_that_does_not_exist(tmp_path):
    from tests.guest_runner import pvh_kernel_from_asm

    k = tmp_path / "k.elf"
    k.write_bytes(pvh_kernel_from_asm("hlt"))
    initrd = tmp_path / "initrd.gz"
    proc = pcihole("run", "--kernel", str(k), "--initrd", str(initrd), "--backend", "model")
    assert_one_error(proc, 2, str(initrd), "No such file")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kernel_that_spins_times_out(tmp_path, backend):
    k = tmp_path / "spin.elf"
    k.write_bytes(pvh_kernel(b"\xeb\xfe"))  # jmp .
    proc = pcihole("run", "--kernel", str(k), "--backend", backend, "--timeout", "0.5")
    assert_one_error(proc, 1, str(k), "timeout", "0.5 s", f"{backend} backend")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kernel_that_triple_faults(tmp_path, backend):
    k = tmp_path / "ud2.elf"
    k.write_bytes(pvh_kernel(b"\x0f\x0b"))  # ud2 with no IDT: #UD -> #DF -> triple fault
    proc = pcihole("run", "--kernel", str(k), "--backend", backend, "--timeout", "30")
    assert_one_error(proc, 1, str(k), "triple-fault", f"{backend} backend")


def test_a_kernel_that_ends_with_a_failure_status(tmp_path):
    k = tmp_path / "fail.elf"
    k.write_bytes(pvh_kernel(b"\xb0\x05\xe6\xf4\xf4"))  # mov $5, %al; out %al, $0xf4; hlt
    assert_one_error(pcihole("run", "--kernel", str(k), "--backend", "model"), 1, str(k), "status 0x5")


def test_acpi_out_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "sub"
    assert_one_error(pcihole("acpi", "--out", str(out)), 2, str(out))


def test_a_good_run_still_prints_no_error():
    proc = pcihole("run", "--backend", "model", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr
