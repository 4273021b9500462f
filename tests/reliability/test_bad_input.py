"""Bad input found by an adversarial pass (issue: "A guest can never crash pcihole"): each case gives one
line, `pcihole: error: ...`, exit status 2, before any guest runs. Through the real command line.

The README "## Errors" table lists these cases too.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys

import pytest

from tests.reliability.test_cli_errors import ROOT, SRC, assert_one_error, pcihole

MACHINE_HEAD = "[machine]\nram_mib = 64\n"
ONE_SEGMENT = "[[segment]]\nid = 0\necam_base = 0xe0000000\n"
# Reading /dev/zero without a bound grows until memory runs out: cap the child's address space so a
# regression fails this test with a MemoryError instead of taking the machine's memory.
ADDRESS_SPACE_CAP = 3 << 30


def pcihole_capped(*args: str, timeout: float = 60):
    """`python -m pcihole.cli` with its address space capped (and a FIFO cannot block the test run)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))

    env = {k: v for k, v in os.environ.items() if k != "PCIHOLE_KVM_DEVICE"}
    env["PYTHONPATH"] = str(SRC)
    cmd = [sys.executable, "-m", "pcihole.cli", *args]
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, preexec_fn=cap
    )


# --- 3: input files are read with a bound, and only regular files ----------------------------------


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_machine_file_that_is_a_device(device):
    line = assert_one_error(pcihole_capped("run", "--machine", device), 2, device, "not a regular file")
    assert "character device" in line, line
    assert_one_error(pcihole_capped("acpi", "--machine", device, "--out", "/nonexistent/x"), 2, device)


def test_a_kernel_that_is_a_device():
    assert_one_error(
        pcihole_capped("run", "--kernel", "/dev/zero", "--backend", "model"),
        2,
        "/dev/zero",
        "not a regular file",
    )


@pytest.mark.parametrize("option", ["--machine", "--kernel"])
def test_an_input_file_that_is_a_fifo(tmp_path, option):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # A FIFO nobody writes to would block open() and read() forever: the timeout only guards the test run.
    line = assert_one_error(
        pcihole_capped("run", option, str(fifo), "--backend", "model", timeout=30), 2, str(fifo)
    )
    assert "not a regular file" in line and "FIFO" in line, line


def test_an_input_file_that_is_a_directory(tmp_path):
    assert_one_error(pcihole("run", "--machine", str(tmp_path)), 2, str(tmp_path), "directory")
    assert_one_error(
        pcihole("run", "--kernel", str(tmp_path), "--backend", "model"), 2, str(tmp_path), "directory"
    )


def test_a_machine_file_larger_than_the_cap(tmp_path):
    f = tmp_path / "big.toml"
    f.write_text(MACHINE_HEAD + ONE_SEGMENT + "#" * (16 << 20) + "\n")
    assert_one_error(pcihole_capped("run", "--machine", str(f)), 2, str(f), "16 MiB")


def test_a_kernel_larger_than_the_cap(tmp_path):
    k = tmp_path / "huge.elf"
    with open(k, "wb") as out:
        out.truncate(513 << 20)  # sparse: costs no disk
    assert_one_error(pcihole_capped("run", "--kernel", str(k), "--backend", "model"), 2, str(k), "512 MiB")


def test_read_input_file_bounds_and_accepts_regular_files(tmp_path):
    from pcihole.host.input_file import InputFileError, read_input_file

    f = tmp_path / "ok.bin"
    f.write_bytes(b"x" * 100)
    assert read_input_file(f, limit=100, what="a test file") == b"x" * 100
    with pytest.raises(InputFileError, match=r"ok\.bin: a test file of 100 bytes is larger than 99 bytes"):
        read_input_file(f, limit=99, what="a test file")
    with pytest.raises(InputFileError, match="empty file name"):
        read_input_file("", limit=99, what="a test file")


# --- 5: named errors instead of `internal error` -----------------------------------------------------


def test_a_machine_file_that_is_not_utf8(tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes(MACHINE_HEAD.encode() + b'name = "caf\xe9"\n' + ONE_SEGMENT.encode())
    assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "UTF-8", "0xe9")


@pytest.mark.parametrize("value", ["[" * 1000 + "]" * 1000, "{a = " * 1000 + "1" + "}" * 1000])
def test_a_machine_file_nested_too_deep(tmp_path, value):
    f = tmp_path / "deep.toml"
    f.write_text(MACHINE_HEAD + f"x = {value}\n" + ONE_SEGMENT)
    assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "nested")


def test_a_machine_file_with_an_integer_of_5000_digits(tmp_path):
    f = tmp_path / "digits.toml"
    f.write_text("[machine]\nram_mib = " + "9" * 5000 + "\n" + ONE_SEGMENT)
    line = assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "4300 digits")
    assert len(line) < 300, line


@pytest.mark.parametrize("value", ["9223372036854775807", "0x" + "f" * 5000, "4097"])
def test_a_machine_file_with_a_huge_ram_size(tmp_path, value):
    f = tmp_path / "ram.toml"
    f.write_text(f"[machine]\nram_mib = {value}\n" + ONE_SEGMENT)
    line = assert_one_error(pcihole("run", "--machine", str(f), "--backend", "model"), 2, str(f), "ram_mib")
    assert len(line) < 300, line


@pytest.mark.parametrize("key", ["ecam_base", "fill", "id"])
def test_a_machine_file_with_a_huge_hex_value(tmp_path, key):
    base = {"id": "0", "ecam_base": "0xe0000000", "fill": "0xff"}
    base[key] = "0x" + "f" * 5000
    f = tmp_path / "hex.toml"
    f.write_text(MACHINE_HEAD + "[[segment]]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()))
    line = assert_one_error(pcihole("run", "--machine", str(f), "--backend", "model"), 2, str(f), key)
    assert len(line) < 300, line


def test_an_append_that_is_not_utf8(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pcihole.cli", "run", "--backend", "model", "--append", b"x\xff"],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert_one_error(proc, 2, "--append", "UTF-8")


# --- 6: --timeout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "-1", "0", "-inf"])
def test_a_timeout_that_is_not_positive(value):
    assert_one_error(pcihole("run", "--backend", "model", "--timeout", value), 2, "--timeout")


@pytest.mark.parametrize("value", ["inf", "1e10", "1e300"])
def test_a_timeout_of_no_limit_runs_the_guest(value):
    """inf (or a finite value too large for the host's timer) means no limit: the guest runs to its end."""
    proc = pcihole("run", "--backend", "model", "--timeout", value, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr


# --- 7, 8: output directories and empty names -------------------------------------------------------


def test_bench_out_that_cannot_be_written_is_refused_before_measuring(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root writes anywhere: drop every capability (CAP_DAC_OVERRIDE) for the child, as a user has none.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, and setpriv (util-linux) is missing to drop CAP_DAC_OVERRIDE")
        prefix = ("setpriv", "--bounding-set=-all", "--")
    proc = pcihole("bench", "--quick", "--backend", "model", "--out", str(out), prefix=prefix)
    # One line and nothing measured: no progress line, no summary.
    assert_one_error(proc, 2, str(out), "Permission denied")
    assert proc.stdout == ""
    assert list(out.iterdir()) == []


def test_bench_out_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = pcihole("bench", "--quick", "--backend", "model", "--out", str(blocker))
    assert_one_error(proc, 2, str(blocker))
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--machine", ""),
        ("run", "--kernel", "", "--backend", "model"),
        ("acpi", "--out", ""),
        ("acpi", "--machine", "", "--out", "x"),
        ("bench", "--out", ""),
    ],
    ids=["run-machine", "run-kernel", "acpi-out", "acpi-machine", "bench-out"],
)
def test_an_empty_file_name_is_refused(args, tmp_path):
    option = args[args.index("") - 1]
    proc = subprocess.run(
        [sys.executable, "-m", "pcihole.cli", *args],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert_one_error(proc, 2, option, "empty")
    assert list(tmp_path.iterdir()) == []


# --- 9: kernel segments over what the machine puts in low memory --------------------------------------


@pytest.mark.parametrize(
    ("paddr", "what"),
    [(0xE0000, "ACPI"), (0x7000, "start info"), (0x8000, "boot stack"), (0x20000, "command line")],
)
def test_a_kernel_segment_over_low_memory_is_refused(tmp_path, paddr, what):
    from tests.boot.elfimages import ELFCLASS32, PF_R, PF_W, PF_X, PT_LOAD, Part, build, phys32_note

    code = b"\xb0\x00\xe6\xf4\xf4"  # mov $0, %al; out %al, $0xf4; hlt
    parts = [
        Part(PT_LOAD, 0x100000, code, flags=PF_R | PF_X, align=0x1000),
        Part(PT_LOAD, paddr, b"\0" * 16, memsz=0x100, flags=PF_R | PF_W, align=0x10),
        phys32_note(0x100000),
    ]
    k = tmp_path / "low.elf"
    k.write_bytes(build(parts, elf_class=ELFCLASS32, entry=0x100000).data)
    line = assert_one_error(pcihole("run", "--kernel", str(k), "--backend", "model"), 2, str(k), what)
    assert f"{paddr:#x}" in line, line


def test_a_kernel_at_16_mib_like_linux_is_accepted(tmp_path):
    from tests.boot.elfimages import ELFCLASS64, PF_R, PF_X, PT_LOAD, Part, build, phys32_note

    code = b"\xb0\x00\xe6\xf4\xf4"
    parts = [Part(PT_LOAD, 0x1000000, code, flags=PF_R | PF_X, align=0x200000), phys32_note(0x1000000)]
    k = tmp_path / "vmlinux-like"
    k.write_bytes(build(parts, elf_class=ELFCLASS64, entry=0x1000000).data)
    proc = pcihole("run", "--kernel", str(k), "--backend", "model")
    assert proc.returncode == 0, proc.stderr


# --- 12: cosmetic ---------------------------------------------------------------------------------------


def test_a_short_elf_header_is_called_truncated(tmp_path):
    k = tmp_path / "short.elf"
    k.write_bytes(b"\x7fELF" + bytes(47))
    assert_one_error(pcihole("run", "--kernel", str(k), "--backend", "model"), 2, str(k), "truncated")


@pytest.mark.parametrize("buses", ["\u0660-\u0665", "0-\uff15", "0-255\n"])
def test_buses_take_ascii_digits_only(tmp_path, buses):
    f = tmp_path / "buses.toml"
    f.write_text(MACHINE_HEAD + ONE_SEGMENT + f"buses = {buses!r}\n".replace("'", '"'), encoding="utf-8")
    assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "buses")


def test_a_bdf_with_a_trailing_newline_is_refused(tmp_path):
    f = tmp_path / "bdf.toml"
    f.write_text(
        MACHINE_HEAD
        + ONE_SEGMENT
        + '[[endpoint]]\nbdf = "0000:00:01.0\\n"\nvendor = 1\ndevice = 2\nclass = 3\n'
    )
    assert_one_error(pcihole("run", "--machine", str(f)), 2, str(f), "bdf")


# --- 15: the ACPI size error names the machine file --------------------------------------------------


def many_segments(n: int, *, spacing: int = 0x200000) -> str:
    return MACHINE_HEAD + "".join(
        f'[[segment]]\nid = {s}\necam_base = {0x10000000 + s * spacing:#x}\nbuses = "0-0"\n' for s in range(n)
    )


def test_acpi_tables_too_large_name_the_machine_file(tmp_path):
    f = tmp_path / "segments.toml"
    f.write_text(many_segments(1500))
    assert_one_error(pcihole("run", "--machine", str(f), "--backend", "model"), 2, str(f), "ACPI")
    assert_one_error(pcihole("acpi", "--machine", str(f), "--out", str(tmp_path / "t")), 2, str(f), "ACPI")


# --- 4: what the run needs from the ELF is checked before the guest runs ----------------------------

EXIT_0 = b"\xb0\x00\xe6\xf4\xf4"  # mov $0, %al; out %al, $0xf4; hlt


def kernel_with_symbols(symbols) -> bytes:
    from tests.boot.elfimages import ELFCLASS32, PF_R, PF_W, PF_X, PT_LOAD, Part, build, phys32_note

    load = Part(PT_LOAD, 0x100000, EXIT_0, memsz=0x1000, flags=PF_R | PF_W | PF_X, align=0x1000)
    return build([load, phys32_note(0x100000)], elf_class=ELFCLASS32, entry=0x100000, symbols=symbols).data


def test_a_broken_symbol_table_is_found_before_the_run(tmp_path):
    import struct

    from tests.boot.elfimages import Sym

    data = bytearray(kernel_with_symbols([Sym("pcihole_report", 0x100100, 0x30)]))
    (shoff,) = struct.unpack_from("<I", data, 32)
    struct.pack_into("<I", data, shoff + 40 + 20, 0x100000)  # .symtab's sh_size: past the end of the file
    k = tmp_path / "badsyms.elf"
    k.write_bytes(bytes(data))
    assert_one_error(pcihole("run", "--kernel", str(k), "--backend", "model"), 2, str(k), "symbol table")


@pytest.mark.parametrize("name", ["pcihole_report", "pcihole_timing"])
def test_a_report_symbol_outside_ram_is_found_before_the_run(tmp_path, name):
    from tests.boot.elfimages import Sym

    k = tmp_path / "farsym.elf"
    k.write_bytes(kernel_with_symbols([Sym(name, 0x7FFF0000, 0x2000, info=0x11)]))
    assert_one_error(pcihole("run", "--kernel", str(k), "--backend", "model"), 2, str(k), name, "RAM")
