"""The C vCPU loop (run_loop.c): built from source on first use, loaded with ctypes, and its table.

run_loop.c says what the loop answers itself (reads of absent pages of fill windows, with the
fill; reads of mirrored pages, from the mirror) and what it returns to Python for (everything
else). This module:

- builds it with the system C compiler (`$CC`, else `cc`) into a cache keyed by the source's hash,
  `$XDG_CACHE_HOME/pcihole/run-loop/<hash>/run_loop.so` (default `~/.cache/pcihole/...`), so the
  repository holds no binary and an edited source is rebuilt; `bin/setup` builds it once;
- loads it (`load()`), or says in one line why it cannot (`CRunLoopUnavailable`: no compiler, no
  <linux/kvm.h>, a failed build), so the caller can fall back to the Python loop and say so;
- keeps the table the loop reads (`FillPages`): per window its base, page count, fill byte, a
  bitmap of present pages and one of mirrored pages with the host address of the window's mirror,
  which the VMM updates on hot-plug while the loop runs (the mirrored ones under a seqlock,
  `mirror_changing`/`mirror_changed`), and the log of the reads the loop answered, handed to a
  sink at every return to Python (and the count of mirror reads, to another).
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
from collections.abc import Callable, Mapping, Sequence
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
        ("mirrored", ctypes.c_void_p),
        ("mirror", ctypes.c_void_p),
        ("fill", ctypes.c_uint8),
    ]


class pcihole_read(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


# LoggedReads reads the log as two u64 words per entry.
assert ctypes.sizeof(pcihole_read) == 16


class pcihole_table(ctypes.Structure):
    _fields_ = [
        ("windows", ctypes.POINTER(pcihole_window)),
        ("nwindows", ctypes.c_uint32),
        ("capacity", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("mirror_reads", ctypes.c_uint32),
        ("log", ctypes.POINTER(pcihole_read)),
        ("mirror_seq", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
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


class LoggedReads:
    """Fill reads the C loop answered, as its log held them (a copy), decoded only when asked: the
    vCPU thread, just back from KVM_RUN, only copies the log."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw  # struct pcihole_read entries

    def __len__(self) -> int:
        return len(self.raw) // ctypes.sizeof(pcihole_read)

    def addresses_and_sizes(self) -> tuple[list[int], list[int]]:
        """Their guest-physical addresses and their sizes, in the order the guest made them."""
        # Two u64 words per entry: the address, then the size (`reserved`, beside it, stays 0).
        words = memoryview(self.raw).cast("Q")
        return words[0::2].tolist(), words[1::2].tolist()


#: Where the answered fill reads go at each return to Python.
ReadSink = Callable[[LoggedReads], None]
#: Where the count of the reads answered from mirror pages goes at each return to Python.
MirrorReadSink = Callable[[int], None]


class FillPages:
    """The C loop's table: windows of guest-physical pages whose reads it answers with the window's
    fill byte, except the pages marked present; of these, it answers the pages marked mirrored
    from the window's mirror. And the log of what it answered."""

    def __init__(
        self,
        loop: CRunLoop,
        windows: Sequence[tuple[int, int, int]],
        sink: ReadSink,
        *,
        mirrors: Mapping[int, int] | None = None,
        mirror_sink: MirrorReadSink | None = None,
    ) -> None:
        """`windows`: (base, size, fill), bases and sizes 4 KiB multiples, not overlapping.
        `mirrors`: window base -> host address of the window's mirror pages (its page i at
        address + i * 4 KiB, mapped as long as the table is used), for the windows that have one;
        `mirror_sink` is then told how many reads were answered from them."""
        self.loop = loop
        self.sink = sink
        self.mirror_sink = mirror_sink
        mirrors = mirrors or {}
        if mirrors and mirror_sink is None:
            raise ValueError("mirrors without a mirror_sink: their reads would go uncounted")
        ordered = sorted(windows)
        self._bases = [base for base, _, _ in ordered]
        self._bitmaps = [(ctypes.c_uint8 * -(-(size >> PAGE_SHIFT) // 8))() for _, size, _ in ordered]
        self._mirrored = [(ctypes.c_uint8 * len(bitmap))() for bitmap in self._bitmaps]
        self._windows = (pcihole_window * len(ordered))(
            *(
                pcihole_window(
                    base,
                    size >> PAGE_SHIFT,
                    ctypes.addressof(bitmap),
                    ctypes.addressof(mirrored),
                    mirrors.get(base),
                    fill,
                )
                for (base, size, fill), bitmap, mirrored in zip(
                    ordered, self._bitmaps, self._mirrored, strict=True
                )
            )
        )
        self._has_mirror = [base in mirrors for base in self._bases]
        self._sizes = [size for _, size, _ in ordered]
        self._log = (pcihole_read * LOG_CAPACITY)()
        self._log_bytes = memoryview(self._log).cast("B")
        self.table = pcihole_table(
            windows=self._windows,
            nwindows=len(ordered),
            capacity=LOG_CAPACITY,
            count=0,
            log=self._log,
        )
        self.table_ref = ctypes.byref(self.table)

    def set_present(self, gpa: int, present: bool) -> None:
        """Mark the page holding `gpa` present (its reads go to Python, or to the mirror where it is
        also marked mirrored) or absent (the C loop answers them with the fill). One byte store,
        which the loop may read at any time: either value is right while the VMM's own state
        changes (pcihole.machine.ecam_window.FillPagesWiring)."""
        i, byte, bit = self._locate(gpa)
        bitmap = self._bitmaps[i]
        bitmap[byte] = bitmap[byte] | bit if present else bitmap[byte] & ~bit

    # The mirrored pages: their bits and their bytes change only between mirror_changing() and
    # mirror_changed() when another thread than the vCPU's may be in the C loop (a seqlock's writer:
    # the loop retries through Python, which waits on the host bridge's lock, any read it copied
    # while a change was under way). One writer at a time: the host bridge calls them under its lock.
    def mirror_changing(self) -> None:
        """Before a change of mirrored bits or mirror bytes (mirror_seq becomes odd)."""
        self.table.mirror_seq = (self.table.mirror_seq + 1) & 0xFFFFFFFF

    def mirror_changed(self) -> None:
        """After it (mirror_seq even again, and different from before the change)."""
        self.table.mirror_seq = (self.table.mirror_seq + 1) & 0xFFFFFFFF

    def set_mirrored(self, gpa: int, mirrored: bool) -> None:
        """Mark the page holding `gpa` mirrored (the C loop answers its reads from the window's
        mirror: its function is in the table and its config space is that page) or not. A page is
        only mirrored while it is present; a window without a mirror has no mirrored page."""
        i, byte, bit = self._locate(gpa)
        if mirrored and not self._has_mirror[i]:
            raise ValueError(f"{gpa:#x}: its window has no mirror in the C loop's table")
        bitmap = self._mirrored[i]
        bitmap[byte] = bitmap[byte] | bit if mirrored else bitmap[byte] & ~bit

    def _locate(self, gpa: int) -> tuple[int, int, int]:
        i = bisect.bisect_right(self._bases, gpa) - 1
        if i < 0 or gpa - self._bases[i] >= self._sizes[i]:
            raise ValueError(f"{gpa:#x} is in no window of the C loop's table")
        page = (gpa - self._bases[i]) >> PAGE_SHIFT
        return i, page >> 3, 1 << (page & 7)

    def flush(self) -> None:
        """Hand the logged reads to the sink, the count of mirror reads to the mirror sink, and
        empty both."""
        table = self.table
        mirror_reads = table.mirror_reads
        if mirror_reads:
            assert self.mirror_sink is not None  # no mirror, no mirror read
            self.mirror_sink(mirror_reads)
            table.mirror_reads = 0
        count = table.count
        if count:
            # One copy of the log (16 KiB at most): this runs on the vCPU thread, between two
            # KVM_RUNs, every 1,024 answered reads; decoding it entry by entry there cost 2% of an
            # `exit` scan, and who needs the addresses (RunStats) decodes them later.
            self.sink(LoggedReads(self._log_bytes[: count * ctypes.sizeof(pcihole_read)].tobytes()))
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
