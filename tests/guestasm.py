"""Tiny test guests, assembled from GNU `as` source at test time (binutils is installed by setup).

Tests read better with the guest's assembly next to the assertions than with hex bytes. Results are
cached per source text for the session.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile


@functools.cache
def assemble(source: str, *, bits: int = 32, org: int = 0) -> bytes:
    """Assemble `source` (AT&T syntax) into a flat binary that runs at guest-physical `org`."""
    directive = {16: ".code16", 32: ".code32", 64: ".code64"}[bits]
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, elf, out = (os.path.join(tmp, n) for n in ("g.s", "g.o", "g.elf", "g.bin"))
        with open(src, "w") as f:
            f.write(f"{directive}\n.text\n.globl _start\n_start:\n{source}\n")
        subprocess.run(["as", "--64" if bits == 64 else "--32", "-o", obj, src], check=True)
        emul = "elf_x86_64" if bits == 64 else "elf_i386"
        subprocess.run(["ld", "-m", emul, "-Ttext", hex(org), "-e", "_start", "-o", elf, obj], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", elf, out], check=True)
        with open(out, "rb") as f:
            return f.read()
