"""Fetching the kernel and busybox: .deb reading (checked on packages dpkg-deb builds), vmlinux out of
a bzImage for every compression the kernel build uses, the cache and its manifest (with the real
apt-get download), and the one-line errors."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pcihole.guest import IMAGE_PATH
from pcihole.linux import fetch
from pcihole.linux.deb import DebError, list_files, read_member
from pcihole.linux.fetch import LinuxFetchError, check_pvh
from pcihole.linux.vmlinuz import LZ4_LEGACY_MAGIC, VmlinuzError, extract_vmlinux

PVH_ELF = IMAGE_PATH.read_bytes()  # the embedded scan guest: a small ELF with the PVH note


# --- .deb -------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not found")
@pytest.mark.parametrize("compression", ["xz", "gzip", "none"])
def test_read_a_file_out_of_a_package_dpkg_deb_built(tmp_path, compression):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: pcihole-test\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-1").write_bytes(b"kernel bytes" * 1000)
    (root / "bin").mkdir()
    (root / "bin" / "busybox").write_bytes(b"\x7fELF busybox")
    os.symlink("busybox", root / "bin" / "sh")
    deb = tmp_path / "t.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    data = deb.read_bytes()
    assert read_member(data, "/boot/vmlinuz-1") == b"kernel bytes" * 1000
    assert read_member(data, "bin/sh") == b"\x7fELF busybox"  # a symlink inside the package, followed
    assert sorted(list_files(data)) == ["/bin/busybox", "/boot/vmlinuz-1"]
    with pytest.raises(DebError, match="no file /boot/vmlinuz-2"):
        read_member(data, "/boot/vmlinuz-2", "t.deb")


def test_not_a_package():
    with pytest.raises(DebError, match="x.deb: not a Debian package"):
        read_member(b"PK\x03\x04 a zip", "/bin/busybox", "x.deb")
    with pytest.raises(DebError, match="runs past the end"):
        read_member(b"!<arch>\n" + b"debian-binary   0           0     0     100644  400       `\n" + b"2.0\n",
                    "/x", "x.deb")  # fmt: skip


# --- vmlinuz ----------------------------------------------------------------------------------------


def bzimage(payload: bytes, setup_sects: int = 4, version: int = 0x020F) -> bytes:
    """A bzImage as the kernel build lays it out (arch/x86/boot/header.S): setup sectors with the
    header, then the protected-mode code holding the compressed kernel at payload_offset."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    pm = b"\x90" * 0x300  # the decompressor's code before the payload
    struct.pack_into("<II", setup, 0x248, len(pm), len(payload))
    return bytes(setup) + pm + payload + struct.pack("<I", len(PVH_ELF)) + b"\0" * 64


def lz4_legacy(data: bytes, block: int = 1 << 16) -> bytes:
    """LZ4's legacy frame as `lz4 -l` and the kernel build write it: magic, then (u32 size, block)*."""
    import lz4.block

    out = struct.pack("<I", LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), block):
        compressed = lz4.block.compress(data[i : i + block], store_size=False)
        out += struct.pack("<I", len(compressed)) + compressed
    return out


COMPRESSORS = {
    "gzip": lambda b: gzip.compress(b, mtime=0),
    "xz": lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
    "bzip2": bz2.compress,
    "lz4": lz4_legacy,
}


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_vmlinux_out_of_a_bzimage(kind):
    if kind == "lz4":
        pytest.importorskip("lz4", reason="the lz4 package (pcihole[linux]) is not installed")
    payload = COMPRESSORS[kind](PVH_ELF)
    assert extract_vmlinux(bzimage(payload)) == (PVH_ELF, kind)
    # Without a usable header (protocol < 2.08), the payload is found by its magic, as
    # scripts/extract-vmlinux finds it.
    assert extract_vmlinux(bzimage(payload, version=0x0207)) == (PVH_ELF, kind)


def test_vmlinuz_errors():
    with pytest.raises(VmlinuzError, match="no known compression"):
        extract_vmlinux(bzimage(b"\x01\x02\x03\x04 not compressed"), "vmlinuz-x")
    with pytest.raises(VmlinuzError, match="does not decompress to an ELF"):
        extract_vmlinux(bzimage(gzip.compress(b"no elf here")), "vmlinuz-x")
    with pytest.raises(VmlinuzError, match="no compressed ELF kernel found"):
        extract_vmlinux(b"MZ" + bytes(4096), "vmlinuz-x")
    with pytest.raises(VmlinuzError, match="zstd"):
        extract_vmlinux(bzimage(b"\x28\xb5\x2f\xfd" + bytes(64)), "vmlinuz-x")


def test_an_elf_is_taken_as_is():
    assert extract_vmlinux(PVH_ELF) == (PVH_ELF, "none")


def test_check_pvh():
    assert check_pvh(PVH_ELF, "scan.elf") > 0
    plain_elf = os.path.realpath(shutil.which("true") or "/bin/true")  # a host program: ELF, no Xen notes
    with pytest.raises(LinuxFetchError, match="no XEN_ELFNOTE_PHYS32_ENTRY"):
        check_pvh(Path(plain_elf).read_bytes(), plain_elf)
    with pytest.raises(LinuxFetchError, match="not an ELF"):
        check_pvh(b"MZ" + bytes(100), "vmlinuz")


# --- cache, manifest, apt -----------------------------------------------------------------------------


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fetch.cache_dir() == tmp_path / "pcihole"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_dir() == tmp_path / "home" / ".cache" / "pcihole"


needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get not found (not Debian)")


@needs_apt
def test_busybox_is_fetched_once_then_served_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        first = fetch.fetch_busybox_entry()
    except LinuxFetchError as e:
        pytest.skip(f"busybox-static cannot be downloaded here: {e}")
    assert first.path.parent == tmp_path / "pcihole" / "linux"
    data = first.path.read_bytes()
    assert data.startswith(b"\x7fELF") and os.access(first.path, os.X_OK)
    manifest = json.loads((first.path.parent / "manifest.json").read_text())
    import hashlib

    assert manifest["busybox"]["sha256"] == hashlib.sha256(data).hexdigest() == first.sha256
    assert manifest["busybox"]["package"] == "busybox-static"
    # The busybox runs: it is the static userland the initramfs gets.
    out = subprocess.run([str(first.path), "echo", "hi"], capture_output=True, text=True, check=True)
    assert out.stdout == "hi\n"
    # Cached: no apt call (none could be made with an empty PATH).
    monkeypatch.setenv("PATH", "")
    assert fetch.fetch_busybox_entry() == first
    # A damaged cache file is not trusted: fetching again needs apt, which is not on PATH now.
    first.path.write_bytes(b"damaged")
    with pytest.raises(LinuxFetchError, match="apt-get not found"):
        fetch.fetch_busybox()


@needs_apt
def test_an_unknown_package_is_one_line(tmp_path):
    with pytest.raises(LinuxFetchError) as e:
        fetch.apt_download("pcihole-no-such-package", tmp_path)
    assert "pcihole-no-such-package" in str(e.value) and "\n" not in str(e.value)


def test_without_apt(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LinuxFetchError, match="apt-cache not found: fetching linux-image-cloud-amd64 needs"):
        fetch.fetch_kernel()


@needs_apt
def test_the_cached_kernel_is_a_pvh_elf():
    """The kernel `bin/setup --test` fetched (or fetches now): an ELF vmlinux with the PVH note."""
    try:
        entry = fetch.fetch_kernel_entry()
    except LinuxFetchError as e:
        pytest.skip(f"the Debian kernel cannot be fetched here: {e}")
    assert entry.package.startswith("linux-image-") and entry.package.endswith("-cloud-amd64")
    assert check_pvh(entry.path.read_bytes(), str(entry.path)) > 0
