"""The initramfs is a gzipped newc cpio that a real cpio reads back (busybox's own cpio applet, from the
fetched busybox-static), holding busybox, its applet links, /dev/console and an /init that a shell
accepts. That the kernel unpacks it and runs /init is checked by the QEMU boot (test_linux_qemu.py)."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess

import pytest

from pcihole.linux.fetch import LinuxFetchError, fetch_busybox
from pcihole.linux.initramfs import APPLETS, INIT_SCRIPT, build_initramfs


@pytest.fixture(scope="module")
def busybox():
    try:
        return fetch_busybox()
    except LinuxFetchError as e:
        pytest.skip(f"busybox-static cannot be fetched here: {e}")


def newc_records(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """(name, mode, data, (rdevmajor, rdevminor)) of each record, read field by field, checking the
    alignment the kernel's unpacker requires (init/initramfs.c: 4-byte aligned names and bodies)."""
    out, pos = [], 0
    while True:
        assert archive[pos : pos + 6] == b"070701", f"no newc magic at {pos:#x}"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        assert archive[pos + 110 + namesize - 1] == 0
        data_at = pos + 110 + namesize
        data_at += -data_at % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, archive[data_at : data_at + filesize], (rmaj, rmin)))
        pos = data_at + filesize
        pos += -pos % 4


def test_the_archive_layout(busybox):
    image = build_initramfs(busybox)
    assert image[:2] == b"\x1f\x8b"  # gzip
    assert build_initramfs(busybox) == image  # reproducible
    records = {name: (mode, data, rdev) for name, mode, data, rdev in newc_records(gzip.decompress(image))}
    mode, data, _ = records["bin/busybox"]
    assert stat.S_ISREG(mode) and mode & 0o111 and data == busybox.read_bytes()
    for applet in APPLETS:
        mode, data, _ = records[f"bin/{applet}"]
        assert stat.S_ISLNK(mode) and data == b"busybox"
    mode, data, _ = records["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 and data.startswith(b"#!/bin/sh\n")
    mode, _, rdev = records["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    for d in ("proc", "sys", "dev"):
        assert stat.S_ISDIR(records[d][0])


def test_a_real_cpio_lists_and_extracts_it(busybox, tmp_path):
    archive = gzip.decompress(build_initramfs(busybox))
    listing = subprocess.run(
        [str(busybox), "cpio", "-t"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    names = set(listing.split())
    assert {"init", "bin/busybox", "dev/console", *(f"bin/{a}" for a in APPLETS)} <= names
    out = tmp_path / "root"
    out.mkdir()
    # Not checked: without root, making /dev/console fails (the rest is extracted all the same).
    subprocess.run([str(busybox), "cpio", "-i", "-d"], input=archive, cwd=out, capture_output=True)
    assert (out / "init").read_text() == INIT_SCRIPT
    assert os.readlink(out / "bin" / "sh") == "busybox"
    assert (out / "bin" / "busybox").read_bytes() == busybox.read_bytes()


def test_init_is_valid_shell_that_busybox_parses(busybox, tmp_path):
    init = tmp_path / "init"
    init.write_text(INIT_SCRIPT)
    proc = subprocess.run([str(busybox), "sh", "-n", str(init)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_init_prints_the_block_for_a_sysfs_tree(busybox, tmp_path):
    """The device loop of /init, run by busybox sh on a made-up sysfs tree (the mounts and the
    power-off are left out): one line per function with the header byte from `config`."""
    sysfs = tmp_path / "sys" / "bus" / "pci" / "devices"
    for bdf, vendor, device, cls, header in [
        ("0000:00:00.0", "0x1b36", "0x0008", "0x060000", 0x00),
        ("0001:40:1f.3", "0x8086", "0x2930", "0x0c0500", 0x80),
    ]:
        d = sysfs / bdf
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
        (d / "class").write_text(cls + "\n")
        (d / "config").write_bytes(bytes(14) + bytes([header]) + bytes(49))
    lines = INIT_SCRIPT.splitlines()
    start = next(i for i, ln in enumerate(lines) if "pci begin" in ln)
    end = next(i for i, ln in enumerate(lines) if "pci end" in ln)
    loop = "\n".join(lines[start : end + 1]).replace("/sys/bus/pci/devices", str(sysfs))
    proc = subprocess.run([str(busybox), "sh", "-c", loop], capture_output=True, text=True, check=True)
    from pcihole.linux.console import parse_linux_console

    report = parse_linux_console(proc.stdout)
    assert report.source == "initramfs", proc.stdout
    assert [(d.bdf, d.vendor, d.class_code, d.header_type, d.multifunction) for d in report.devices] == [
        ("0000:00:00.0", 0x1B36, 0x060000, 0, False),
        ("0001:40:1f.3", 0x8086, 0x0C0500, 0, True),
    ]
