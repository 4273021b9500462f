"""The Debian cloud kernel and busybox-static for the full-boot test, fetched with `apt-get download`
(nothing is installed) and cached under the user's cache directory.

A stand-in until pcihole has its own `pcihole linux fetch`: the same steps, kept small. The vmlinuz
is a bzImage whose payload is the ELF vmlinux compressed with LZ4 (the cloud flavour) or XZ; it is
found by its compression magic, as the kernel's scripts/extract-vmlinux does.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pcihole" / "test-linux"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
XZ_MAGIC = b"\xfd7zXZ\x00"


class Unavailable(Exception):
    """The packages cannot be had here; the message says why (the test skips with it)."""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError as e:
        raise Unavailable(f"{cmd[0]} is not installed") from e
    if p.returncode != 0:
        raise Unavailable(f"{' '.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")
    return p.stdout


def _download(package: str, into: Path) -> Path:
    _run(["apt-get", "download", package], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise Unavailable(f"apt-get download {package} gave no .deb")
    return debs[-1]


def _deb_member(deb: Path, pattern: str) -> bytes:
    """The bytes of the first file in the .deb's data archive whose path matches `pattern`."""
    tar_bytes = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar.getmembers():
            if member.isfile() and re.fullmatch(pattern, member.name):
                f = tar.extractfile(member)
                assert f is not None
                return f.read()
    raise Unavailable(f"{deb.name} has no file matching {pattern}")


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    at = vmlinuz.find(LZ4_LEGACY_MAGIC)
    if at >= 0:
        if shutil.which("lz4") is None:
            raise Unavailable(
                "the kernel is LZ4-compressed and the lz4 tool is not installed (apt-get install lz4)"
            )
        out = subprocess.run(["lz4", "-dc"], input=vmlinuz[at:], capture_output=True).stdout
    else:
        at = vmlinuz.find(XZ_MAGIC)
        if at < 0:
            raise Unavailable("no LZ4 or XZ payload found in the vmlinuz")
        out = lzma.LZMADecompressor().decompress(vmlinuz[at:])
    if not out.startswith(b"\x7fELF"):
        raise Unavailable("the decompressed payload is not an ELF vmlinux")
    return out


def kernel_package() -> str:
    """The versioned package the cloud meta-package depends on, e.g. linux-image-6.1.0-57-cloud-amd64."""
    for line in _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)$", line)
        if m:
            return m.group(1)
    raise Unavailable(f"apt-cache depends {KERNEL_META_PACKAGE} names no kernel package")


def fetch() -> tuple[Path, Path]:
    """(vmlinux, busybox), cached."""
    vmlinux, busybox = CACHE / "vmlinux", CACHE / "busybox"
    if vmlinux.exists() and busybox.exists():
        return vmlinux, busybox
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt-get download runs as _apt where it can
        image = _deb_member(_download(kernel_package(), work), r"\./boot/vmlinuz-.*")
        bb = _deb_member(_download("busybox-static", work), r"\./bin/busybox")
        (work / "vmlinux").write_bytes(extract_vmlinux(image))
        (work / "busybox").write_bytes(bb)
        os.replace(work / "busybox", busybox)
        os.replace(work / "vmlinux", vmlinux)
    return vmlinux, busybox


def _newc(name: str, mode: int, data: bytes, ino: int) -> bytes:
    """One entry of a newc ("070701") cpio archive (the format the kernel's initramfs unpacker reads)."""
    name_bytes = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_bytes), 0)
    out = b"070701" + b"".join(b"%08X" % v for v in fields) + name_bytes
    out += b"\0" * (-len(out) % 4)
    return out + data + b"\0" * (-len(data) % 4)


INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo pcihole-init: user space runs
/bin/busybox poweroff -f
"""


def initramfs(busybox: Path) -> bytes:
    """A gzipped newc archive: /bin/busybox and an /init that says it ran and powers off."""
    entries = [
        ("bin", 0o040755, b""),
        ("proc", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("init", 0o100755, INIT),
        ("TRAILER!!!", 0, b""),
    ]
    archive = b"".join(_newc(n, m, d, i + 1) for i, (n, m, d) in enumerate(entries))
    return gzip.compress(archive)
