"""The C vCPU loop (run_loop.c): built from source on first use, loaded with ctypes, and its table.

run_loop.c says what the loop answers itself (reads of absent pages of fill windows) and what it
returns to Python for (everything else). This module:

- builds it with the system C compiler (`$CC`, else `cc`) into a cache keyed by the source's hash,
  `$XDG_CACHE_HOME/pcihole/run-loop/<hash>/run_loop.so` (default `~/.cache/pcihole/...`), so the
  repository holds no binary and an edited source is rebuilt; `bin/setup` builds it once;
- loads it (`load()`), or says in one line why it cannot (`CRunLoopUnavailable`: no compiler, no
  <linux/kvm.h>, a failed build), so the caller can fall back to the Python loop and say so;
- keeps the table the loop reads (`FillPages`): per window its base, page count, fill byte and a
  bitmap of present pages, which the VMM updates on hot-plug while the loop runs, and the log of
  the reads the loop answered, handed to a sink at every return to Python.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pcihole.host.cache_dir import cache_dir

if TYPE_CHECKING:
    from pcihole.hv.exits import VcpuExit

SOURCE = Path(__file__).with_name("run_loop.c")
#: pcihole_run's non-negative returns (run_loop.c)
EXIT_FOR_PYTHON = 0
LOG_FULL = 1
#: Reads the loop answers before it returns to hand over its log (a bound on how long the vCPU
#: thread stays in C without an exit for Python: about 1,024 x 10-20 us here).
LOG_CAPACITY = 1024
PAGE_SHIFT = 12
CFLAGS = ("-O2", "-shared", "-fPIC", "-Wall", "-Werror")


class CRunLoopUnavailable(RuntimeError):
    """The C loop cannot be built or loaded here; the message says why, in one line."""


class pcihole_window(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("pages", ctypes.c_uint64),
        ("present", ctypes.c_void_p),
        ("fill", ctypes.c_uint8),
    ]


class pcihole_read(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


# FillPages.flush reads the log as two u64 words per entry.
assert ctypes.sizeof(pcihole_read) == 16


class pcihole_table(ctypes.Structure):
    _fields_ = [
        ("windows", ctypes.POINTER(pcihole_window)),
        ("nwindows", ctypes.c_uint32),
        ("capacity", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("log", ctypes.POINTER(pcihole_read)),
    ]


def cache_root() -> Path:
    """$XDG_CACHE_HOME/pcihole/run-loop, or ~/.cache/pcihole/run-loop (the XDG default)."""
    return cache_dir() / "run-loop"


def source_hash(source: Path = SOURCE) -> str:
    """The cache key: the source and the flags it is built with."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    return digest.hexdigest()[:16]


def build(source: Path = SOURCE, cache: Path | None = None) -> Path:
    """The shared object for `source`, compiled into `cache` (cache_root() by default) unless a build
    of the same source is there. Raises CRunLoopUnavailable saying why it cannot be built."""
    out_dir = (cache or cache_root()) / source_hash(source)
    library = out_dir / "run_loop.so"
    if library.exists():
        return library
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise CRunLoopUnavailable(
            f"no C compiler ({compiler!r} not found; install gcc) to build {source.name}"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Compile beside the target, then rename: a concurrent build or a killed one never leaves a
        # half-written library under the final name.
        with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            done = subprocess.run(
                [compiler, *CFLAGS, "-o", str(partial), str(source)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                first = next(
                    (line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()
                )
                raise CRunLoopUnavailable(f"{compiler} could not build {source.name}: {first}")
            partial.replace(library)
        finally:
            partial.unlink(missing_ok=True)
    except OSError as e:
        raise CRunLoopUnavailable(f"cannot build {source.name} in {out_dir}: {e}") from e
    return library


class CRunLoop:
    """The loaded library: `run(fd, kvm_run address, ring offset, table)` -> pcihole_run's return."""

    def __init__(self, library: Path) -> None:
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as e:
            raise CRunLoopUnavailable(f"cannot load {library}: {e}") from e
        self.library = library
        # ctypes.CDLL releases the GIL for the call: the vCPU thread sits in KVM_RUN for most of it.
        self.run = lib.pcihole_run
        self.run.restype = ctypes.c_int
        self.run.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(pcihole_table)]


_loaded: CRunLoop | CRunLoopUnavailable | None = None


def load() -> CRunLoop:
    """The C loop, built on first use (once per process; a failure is remembered too)."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = CRunLoop(build())
        except CRunLoopUnavailable as e:
            _loaded = e
    if isinstance(_loaded, CRunLoopUnavailable):
        raise _loaded
    return _loaded


#: Where the answered reads go at each return to Python: their guest-physical addresses and their
#: sizes, in the order the guest made them (two lists of the same length).
ReadSink = Callable[[list[int], list[int]], None]


class FillPages:
    """The C loop's table: windows of guest-physical pages whose reads it answers with the window's
    fill byte, except the pages marked present; and the log of what it answered."""

    def __init__(self, loop: CRunLoop, windows: Sequence[tuple[int, int, int]], sink: ReadSink) -> None:
        """`windows`: (base, size, fill), bases and sizes 4 KiB multiples, not overlapping."""
        self.loop = loop
        self.sink = sink
        ordered = sorted(windows)
        self._bases = [base for base, _, _ in ordered]
        self._bitmaps = [(ctypes.c_uint8 * -(-(size >> PAGE_SHIFT) // 8))() for _, size, _ in ordered]
        self._windows = (pcihole_window * len(ordered))(
            *(
                pcihole_window(base, size >> PAGE_SHIFT, ctypes.addressof(bitmap), fill)
                for (base, size, fill), bitmap in zip(ordered, self._bitmaps, strict=True)
            )
        )
        self._sizes = [size for _, size, _ in ordered]
        self._log = (pcihole_read * LOG_CAPACITY)()
        self._log_words = memoryview(self._log).cast("B").cast("Q")
        self.table = pcihole_table(
            windows=self._windows,
            nwindows=len(ordered),
            capacity=LOG_CAPACITY,
            count=0,
            log=self._log,
        )
        self.table_ref = ctypes.byref(self.table)

    def set_present(self, gpa: int, present: bool) -> None:
        """Mark the page holding `gpa` present (its reads go to Python) or absent (the C loop answers
        them with the fill). One byte store, which the loop may read at any time: either value is
        right while the VMM's own state changes (pcihole.machine.ecam_window.FillPagesWiring)."""
        bitmap, byte, bit = self._locate(gpa)
        bitmap[byte] = bitmap[byte] | bit if present else bitmap[byte] & ~bit

    def _locate(self, gpa: int) -> tuple[ctypes.Array[ctypes.c_uint8], int, int]:
        i = bisect.bisect_right(self._bases, gpa) - 1
        if i < 0 or gpa - self._bases[i] >= self._sizes[i]:
            raise ValueError(f"{gpa:#x} is in no window of the C loop's table")
        page = (gpa - self._bases[i]) >> PAGE_SHIFT
        return self._bitmaps[i], page >> 3, 1 << (page & 7)

    def flush(self) -> None:
        """Hand the logged reads to the sink and empty the log."""
        count = self.table.count
        if count:
            # The log as u64 words, two per entry: the address, then the size (the u32 beside it,
            # `reserved`, stays 0). Two list copies instead of two ctypes field reads and a tuple per
            # read: this runs on the vCPU thread, between two KVM_RUNs, every 1,024 answered reads.
            words = self._log_words[: 2 * count]
            self.sink(words[0::2].tolist(), words[1::2].tolist())
            self.table.count = 0


@runtime_checkable
class AnsweringVcpu(Protocol):
    """A vCPU whose KVM_RUN the C loop can make, answering `fill_pages`' reads between two runs:
    the kvm backend's (hv/kvm/vcpu.py). The model's vCPU runs guest code in Unicorn, with no KVM_RUN
    for the loop to call, so the hypervisor interface's Vcpu has no such method."""

    def run_answering(self, fill_pages: FillPages) -> VcpuExit: ...


def main() -> int:
    """`python -m pcihole.hv.kvm.c_run_loop`: build the C loop (bin/setup does); one line either way."""
    try:
        print(build())
    except CRunLoopUnavailable as e:
        print(f"the C run loop cannot be built: {e}; pcihole will use the Python loop", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
