"""Read one file out of a Debian package (.deb) with the standard library, as `dpkg-deb -x` would.

A .deb is an ar archive (deb(5)): `debian-binary`, `control.tar.*`, `data.tar.*`. ar members have a
60-byte header (ar(5): name 16, mtime 12, uid 6, gid 6, mode 8, size 10, "`\\n") and are padded to
an even offset. data.tar is compressed with xz, gzip, bzip2 (tarfile reads them) or, since dpkg 1.21,
zstd (not in this Python's standard library; Debian's own packages use xz).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import PurePosixPath

AR_MAGIC = b"!<arch>\n"
AR_HEADER_SIZE = 60
AR_FMAG = b"`\n"


class DebError(ValueError):
    """The package is not a .deb pcihole can read, or lacks the file; the message names both."""


def ar_members(data: bytes, name: str = "<deb>") -> dict[str, bytes]:
    """Every member of an ar archive, by name."""
    if not data.startswith(AR_MAGIC):
        raise DebError(f"{name}: not a Debian package (no ar magic)")
    members: dict[str, bytes] = {}
    pos = len(AR_MAGIC)
    while pos + AR_HEADER_SIZE <= len(data):
        header = data[pos : pos + AR_HEADER_SIZE]
        if header[58:60] != AR_FMAG:
            raise DebError(f"{name}: bad ar member header at offset {pos:#x}")
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DebError(f"{name}: bad ar member size at offset {pos:#x}") from None
        start = pos + AR_HEADER_SIZE
        if start + size > len(data):
            raise DebError(f"{name}: ar member {member!r} at offset {pos:#x} runs past the end of the file")
        members[member] = data[start : start + size]
        pos = start + size + (size & 1)
    return members


def _tar_path(member_name: str) -> PurePosixPath:
    """A data.tar member's absolute path ("./boot/x" -> /boot/x)."""
    return PurePosixPath("/" + member_name.removeprefix("./").lstrip("/"))


def _data_tar(deb: bytes, name: str) -> tuple[str, bytes]:
    members = ar_members(deb, name)
    data_name = next((m for m in members if m.startswith("data.tar")), None)
    if data_name is None:
        raise DebError(f"{name}: no data.tar member (members: {', '.join(members) or 'none'})")
    if data_name.endswith(".zst"):
        raise DebError(f"{name}: {data_name} is zstd-compressed, which Python's tarfile cannot read")
    return data_name, members[data_name]


def read_member(deb: bytes, path: str, name: str = "<deb>") -> bytes:
    """The contents of `path` (e.g. "/bin/busybox") in the package's data.tar; a symlink is followed
    once inside the archive."""
    data_name, data = _data_tar(deb, name)
    want = PurePosixPath("/" + path.lstrip("/"))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            by_path = {_tar_path(m.name): m for m in tar.getmembers()}
            info = by_path.get(want)
            if info is not None and info.issym():
                info = by_path.get(want.parent / info.linkname)
            if info is None or not info.isfile():
                raise DebError(f"{name}: no file {want} in {data_name}")
            f = tar.extractfile(info)
            assert f is not None  # isfile() above
            return f.read()
    except tarfile.TarError as e:
        raise DebError(f"{name}: cannot read {data_name}: {e}") from None


def list_files(deb: bytes, name: str = "<deb>") -> list[str]:
    """Every regular file's absolute path in the package's data.tar."""
    data_name, data = _data_tar(deb, name)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            return [str(_tar_path(m.name)) for m in tar.getmembers() if m.isfile()]
    except tarfile.TarError as e:
        raise DebError(f"{name}: cannot read {data_name}: {e}") from None
