"""Reading a file the user names (a machine file, a kernel, an initrd): only regular files, up to a cap.

A path can name anything: /dev/zero or /dev/urandom never end (an unbounded read grows until memory
runs out), a FIFO blocks open(2) and read(2) until a writer comes, a directory cannot be read. So the
file is opened with O_NONBLOCK (open(2) of a FIFO for reading then returns at once), checked with
fstat(2) to be a regular file no larger than the cap, and read with a bound of cap + 1 bytes, which
also catches a file that grows while it is read. Errors are one line naming the file.
"""

from __future__ import annotations

import os
import stat
from os import PathLike

KiB, MiB = 1 << 10, 1 << 20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


class InputFileError(ValueError):
    """The file cannot be used as input; str() is one line, "<path>: <problem>"."""


def size_text(n: int) -> str:
    """512 MiB, 1 MiB, 64 KiB or 100 bytes: how a cap reads in a message."""
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return f"of type {stat.S_IFMT(mode):#o}"


def read_input_file(path: str | PathLike[str], *, limit: int, what: str) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; `what` names it in errors
    ("a machine file"). InputFileError for an empty name, a file that is not regular or is too
    large; OSError (with .strerror) when it cannot be opened or read."""
    name = os.fspath(path)
    if name == "":
        raise InputFileError(f"an empty file name names no file (wanted: {what})")
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{name}: not a regular file ({_kind(st.st_mode)}), so it cannot be {what}")
        if st.st_size > limit:
            raise InputFileError(f"{name}: {what} of {st.st_size} bytes is larger than {size_text(limit)}")
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, MiB))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise InputFileError(f"{name}: {what} grew past {size_text(limit)} while it was read")
        return data
    finally:
        os.close(fd)


__all__ = ["InputFileError", "read_input_file", "size_text"]
