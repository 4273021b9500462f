"""Build the embedded scan guest (``scan.elf``) from its sources with the machine's gcc and ld.

Usage::

    python -m pcihole.guest.build            # rebuild src/pcihole/guest/scan.elf (+ scan.toolchain)
    python -m pcihole.guest.build --out X    # build somewhere else, leave the committed image alone
    python -m pcihole.guest.build --check    # build in a temporary directory, compare with scan.elf

The build is reproducible: the compiler runs in this directory on relative file names, with no
``.comment`` (``-fno-ident``), no build-id and no debug info, so two builds give the same bytes.
The same bytes are only expected from the same toolchain; ``scan.toolchain`` records the one that
built the committed image.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent
IMAGE = GUEST_DIR / "scan.elf"
TOOLCHAIN_FILE = GUEST_DIR / "scan.toolchain"

SOURCES_C = ["scan.c"]
SOURCES_S = ["entry.S"]
LINKER_SCRIPT = "scan.ld"

CFLAGS = [
    "-m32",
    "-march=i686",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-nostdlib",
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fno-ident",
    "-fno-builtin",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    # Keep gcc from turning loops into memset/memcpy calls (there is no libc).
    "-fno-tree-loop-distribute-patterns",
    "-mgeneral-regs-only",
    "-mno-red-zone",
]
LDFLAGS = ["-m", "elf_i386", "-nostdlib", "--build-id=none", "-z", "noexecstack", "-T", LINKER_SCRIPT]


class BuildError(RuntimeError):
    pass


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(LC_ALL="C", LANG="C", SOURCE_DATE_EPOCH="0")
    env.pop("GCC_EXEC_PREFIX", None)
    env.pop("CFLAGS", None)
    return env


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=GUEST_DIR, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def tools() -> tuple[str, str]:
    gcc = shutil.which(os.environ.get("PCIHOLE_GCC", "gcc"))
    ld = shutil.which(os.environ.get("PCIHOLE_LD", "ld"))
    if not gcc or not ld:
        raise BuildError("gcc and ld (binutils) are needed to build the guest")
    return gcc, ld


def toolchain() -> str:
    """First lines of ``gcc --version`` and ``ld --version``: what the image bytes depend on."""
    gcc, ld = tools()
    return f"{_run([gcc, '--version']).splitlines()[0]}\n{_run([ld, '--version']).splitlines()[0]}\n"


def commands(objdir: Path, out: Path) -> list[list[str]]:
    gcc, ld = tools()
    cmds: list[list[str]] = []
    objs: list[str] = []
    for src in SOURCES_S + SOURCES_C:
        obj = str(objdir / (Path(src).stem + ".o"))
        cmds.append([gcc, *CFLAGS, "-c", src, "-o", obj])
        objs.append(obj)
    cmds.append([ld, *LDFLAGS, "-o", str(out), *objs])
    return cmds


def build(out: Path | None = None, *, verbose: bool = False) -> bytes:
    """Build the image; write it to ``out`` if given. Returns the image bytes."""
    with tempfile.TemporaryDirectory(prefix="pcihole-guest-") as tmp:
        tmpdir = Path(tmp)
        elf = tmpdir / "scan.elf"
        for cmd in commands(tmpdir, elf):
            if verbose:
                print("+ " + " ".join(cmd), file=sys.stderr)
            _run(cmd)
        data = elf.read_bytes()
    if out is not None:
        Path(out).write_bytes(data)
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pcihole.guest.build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the image here instead of the packaged scan.elf")
    ap.add_argument(
        "--check", action="store_true", help="only check that the packaged scan.elf is up to date"
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="print the commands")
    args = ap.parse_args(argv)
    try:
        if args.check:
            data = build(verbose=args.verbose)
            committed = IMAGE.read_bytes() if IMAGE.exists() else b""
            if data != committed:
                print(f"{IMAGE} is out of date (rebuild: python -m pcihole.guest.build)", file=sys.stderr)
                return 1
            print(f"{IMAGE} is up to date ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
            return 0
        out = args.out or IMAGE
        data = build(out, verbose=args.verbose)
        if args.out is None:
            TOOLCHAIN_FILE.write_text(toolchain())
        print(f"wrote {out} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
        return 0
    except BuildError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
