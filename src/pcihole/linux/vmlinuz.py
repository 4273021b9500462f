"""The ELF vmlinux inside a bzImage (vmlinuz), whatever it is compressed with.

Where the file is a bzImage with boot protocol 2.08 or later (Documentation/x86/boot.rst), the
header says exactly where the compressed kernel is: `payload_offset` (0x248) and `payload_length`
(0x24c), relative to the protected-mode code at `(setup_sects + 1) * 512` (setup_sects at 0x1f1, 0
meaning 4). Otherwise every offset where a compression magic occurs is tried, as the kernel's
scripts/extract-vmlinux does, until one decompresses to something starting with `\\x7fELF`.

Decompressors: gzip, xz, lzma and bzip2 from the standard library. LZ4 needs the `lz4` package
(`pip install 'pcihole[linux]'`): Debian's cloud kernel is LZ4. Why the package and not Debian's
`lz4` tool: the kernel writes LZ4's *legacy* frame (magic 0x184c2102, then blocks of u32 compressed
size + an LZ4 block of at most 8 MiB, lib/decompress_unlz4.c) followed by the 4-byte decompressed
size the kernel build appends (scripts/Makefile.lib size_append); walking those blocks takes ten
lines here around `lz4.block.decompress`, the reference binding with wheels for every Linux Python,
whereas the tool needs a subprocess and fails on the size trailer. zstd (Ubuntu's kernels) is not
supported: Python 3.11 has no zstd.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable

from pcihole.boot.elf import ELF_MAGIC

BZIMAGE_MAGIC_OFFSET = 0x202  # "HdrS"
BZIMAGE_MAGIC = b"HdrS"
SETUP_SECTS_OFFSET = 0x1F1
VERSION_OFFSET = 0x206
PAYLOAD_OFFSET = 0x248  # u32 payload_offset, u32 payload_length (protocol 2.08+)
PAYLOAD_PROTOCOL = 0x0208
SECTOR = 512

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK_MAX = 8 << 20  # lib/decompress_unlz4.c: LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE

# Magic numbers, as scripts/extract-vmlinux lists them; for lzma (properties byte 0x5d, then the
# dictionary size) only three bytes, so that dictionaries under 16 MiB are recognised too.
MAGICS: dict[str, bytes] = {
    "gzip": b"\x1f\x8b\x08",
    "xz": b"\xfd7zXZ\x00",
    "bzip2": b"BZh",
    "lzma": b"\x5d\x00\x00",
    "lz4": struct.pack("<I", LZ4_LEGACY_MAGIC),
    "zstd": b"\x28\xb5\x2f\xfd",
}


class VmlinuzError(ValueError):
    """No ELF could be extracted; the message says what was found."""


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)


def _unlzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)


def _bunzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data)


def _unlz4_legacy(data: bytes) -> bytes:
    try:
        import lz4.block  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise VmlinuzError(
            "the kernel is LZ4-compressed: install the lz4 package (pip install 'pcihole[linux]')"
        ) from None
    pos, out = 0, bytearray()
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if size == LZ4_LEGACY_MAGIC:  # a new frame (concatenated legacy frames)
            pos += 4
            continue
        if pos + 4 + size > len(data):
            break  # the size trailer (or padding) after the last block
        out += lz4.block.decompress(data[pos + 4 : pos + 4 + size], uncompressed_size=LZ4_LEGACY_BLOCK_MAX)
        pos += 4 + size
    return bytes(out)


def _unzstd(data: bytes) -> bytes:
    raise VmlinuzError(
        "the kernel is zstd-compressed, which pcihole cannot decompress (Python 3.11 has no zstd)"
    )


DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _gunzip,
    "xz": _unxz,
    "bzip2": _bunzip2,
    "lzma": _unlzma,
    "lz4": _unlz4_legacy,
    "zstd": _unzstd,
}


def bzimage_payload(image: bytes) -> bytes | None:
    """The compressed kernel a bzImage header points at, or None for an image without that header."""
    if image[BZIMAGE_MAGIC_OFFSET : BZIMAGE_MAGIC_OFFSET + 4] != BZIMAGE_MAGIC:
        return None
    (version,) = struct.unpack_from("<H", image, VERSION_OFFSET)
    if version < PAYLOAD_PROTOCOL:
        return None
    setup_sects = image[SETUP_SECTS_OFFSET] or 4
    offset, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET)
    start = (setup_sects + 1) * SECTOR + offset
    if not length or start + length > len(image):
        return None
    return image[start : start + length]


def compression_of(payload: bytes) -> str | None:
    for name, magic in MAGICS.items():
        if payload.startswith(magic):
            return name
    return None


def extract_vmlinux(image: bytes, name: str = "vmlinuz") -> tuple[bytes, str]:
    """(the ELF vmlinux, the compression it was found under) from a bzImage, or from an ELF as is."""
    if image.startswith(ELF_MAGIC):
        return image, "none"
    payload = bzimage_payload(image)
    if payload is not None:
        kind = compression_of(payload)
        if kind is None:
            raise VmlinuzError(
                f"{name}: the bzImage payload starts with {payload[:6].hex()}, no known compression"
            )
        vmlinux = _decompress(kind, payload, name)
        if not vmlinux.startswith(ELF_MAGIC):
            raise VmlinuzError(f"{name}: the {kind} payload does not decompress to an ELF")
        return vmlinux, kind
    # No usable header: scan for every magic, as scripts/extract-vmlinux does.
    for kind, magic in MAGICS.items():
        pos = image.find(magic)
        while pos >= 0:
            try:
                vmlinux = _decompress(kind, image[pos:], name)
            except VmlinuzError as e:
                if "cannot decompress" not in str(e):
                    raise
            else:
                if vmlinux.startswith(ELF_MAGIC):
                    return vmlinux, kind
            pos = image.find(magic, pos + 1)
    raise VmlinuzError(f"{name}: no compressed ELF kernel found (not a bzImage, no known compression magic)")


def _decompress(kind: str, payload: bytes, name: str) -> bytes:
    try:
        return DECOMPRESSORS[kind](payload)
    except VmlinuzError:
        raise
    except Exception as e:  # zlib.error, lzma.LZMAError, OSError, lz4's RuntimeError, EOFError...
        raise VmlinuzError(f"{name}: cannot decompress the {kind} payload: {e}") from None
