"""pcihole's initramfs: busybox and an /init that prints what Linux's PCI core found, then powers off.

The archive is a "newc" cpio (the kernel's Documentation/driver-api/early-userspace/buffer-format.rst:
a 110-byte ASCII header "070701" + 13 eight-digit hex fields, the NUL-terminated name padded to 4
bytes, the data padded to 4 bytes, ending with "TRAILER!!!"), gzipped: the kernel unpacks it itself
(init/initramfs.c), no module needed.

/init prints one block between marker lines that `console.parse_linux_console` reads; each function
is one line, so that a printk landing in the middle of the block spoils at most that line (the
count on the end marker tells; /init first lowers the console log level to KERN_EMERG, `dmesg -n 1`,
so that none does):

    pcihole-linux: pci begin
    pcihole-linux: pci 0000:00:1f.0 0x8086 0x2918 0x060100 80
    pcihole-linux: pci end 1

(domain:bus:dev.fn, vendor, device, class from sysfs, then the raw header type byte from `config`,
"-" where it cannot be read), then the kernel's MCFG/ECAM lines from dmesg between
"pcihole-linux: ecam begin" and "pcihole-linux: ecam end", then `poweroff -f`.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

NEWC_MAGIC = b"070701"
NEWC_TRAILER = "TRAILER!!!"
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000

MARKER = "pcihole-linux:"
INIT_REACHED = f"{MARKER} init"
PCI_BEGIN = f"{MARKER} pci begin"
PCI_LINE = f"{MARKER} pci "
PCI_END = f"{MARKER} pci end"
ECAM_BEGIN = f"{MARKER} ecam begin"
ECAM_END = f"{MARKER} ecam end"

#: The busybox applets /init calls (each a symlink to /bin/busybox, as `busybox --install -s` makes).
APPLETS = ("sh", "mount", "cat", "echo", "od", "tr", "dmesg", "grep", "poweroff", "sleep")

DIRECTORIES = ("/bin", "/dev", "/proc", "/sys", "/sbin", "/root", "/tmp")

# The kernel opens /dev/console for init's stdin/stdout/stderr before devtmpfs could be mounted
# (init/main.c console_on_rootfs), so the node is in the archive (major 5, minor 1, devices.txt).
CONSOLE = ("/dev/console", 5, 1)

INIT_SCRIPT = f"""#!/bin/sh
# pcihole's /init: print what Linux's PCI core found, then power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Only KERN_EMERG on the console from here (reboot's "Power down" still comes): a kernel message
# printed while the block below is written lands inside one of its lines (on the model, under
# load: "hrtimer: interrupt took ... ns"), and the block is then not Linux's answer.
dmesg -n 1
echo "{INIT_REACHED}"
echo "{PCI_BEGIN}"
n=0
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    # Byte 14 of config space is the header type (bit 7: multi-function); "-" if unreadable.
    ht=$(od -An -tx1 -j14 -N1 "$d/config" 2>/dev/null | tr -d ' \\n')
    echo "{PCI_LINE}${{d##*/}} $(cat "$d/vendor") $(cat "$d/device") $(cat "$d/class") ${{ht:--}}"
    n=$((n + 1))
done
echo "{PCI_END} $n"
echo "{ECAM_BEGIN}"
dmesg | grep -E 'MMCONFIG|MCFG|ECAM'
echo "{ECAM_END}"
poweroff -f
# poweroff -f returns only if the kernel could not power off; panic=-1 then ends the run.
sleep 1
"""


@dataclass(frozen=True)
class CpioEntry:
    name: str  # without the leading "/"
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_entry(entry: CpioEntry, ino: int) -> bytes:
    """One newc record: header, name (NUL-terminated, padded to 4), data (padded to 4)."""
    name = entry.name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid: root
        0,  # gid
        2 if entry.mode & S_IFDIR == S_IFDIR else 1,  # nlink
        0,  # mtime: 0, so the archive is reproducible
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check: unused by newc
    )
    header = NEWC_MAGIC + b"".join(b"%08x" % f for f in fields)
    out = header + name
    out += b"\0" * (-len(out) % 4)
    out += entry.data
    out += b"\0" * (-len(out) % 4)
    return out


def newc_archive(entries: list[CpioEntry]) -> bytes:
    records = [newc_entry(e, ino) for ino, e in enumerate(entries, start=1)]
    records.append(newc_entry(CpioEntry(NEWC_TRAILER, 0), 0))
    return b"".join(records)


def initramfs_entries(busybox: bytes, init_script: str = INIT_SCRIPT) -> list[CpioEntry]:
    entries = [CpioEntry(d.lstrip("/"), S_IFDIR | 0o755) for d in DIRECTORIES]
    path, major, minor = CONSOLE
    entries.append(CpioEntry(path.lstrip("/"), S_IFCHR | 0o600, rdev=(major, minor)))
    entries.append(CpioEntry("bin/busybox", S_IFREG | 0o755, busybox))
    entries += [CpioEntry(f"bin/{applet}", S_IFLNK | 0o777, b"busybox") for applet in APPLETS]
    entries.append(CpioEntry("init", S_IFREG | 0o755, init_script.encode()))
    return entries


def build_initramfs(busybox: Path | bytes) -> bytes:
    """The gzipped newc initramfs holding `busybox` (a path to the binary, or its bytes) and pcihole's /init."""
    binary = busybox if isinstance(busybox, bytes) else Path(busybox).read_bytes()
    # mtime=0: the same inputs give the same bytes.
    return gzip.compress(newc_archive(initramfs_entries(binary)), compresslevel=6, mtime=0)
