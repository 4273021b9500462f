"""The Debian cloud kernel and busybox-static, fetched with apt and cached; nothing is installed.

`apt-get download` puts the .deb in a temporary directory (no `apt-get install`, nothing written to
/boot or anywhere outside the cache); the file needed is read out of the package with Python
(`deb.read_member`), the kernel's ELF vmlinux extracted from vmlinuz (`vmlinuz.extract_vmlinux`) and
checked to carry the PVH entry note, then both are cached under `cache_dir()/linux/` beside a small
JSON manifest (package, version, sha256, file). A cached file whose sha256 still matches is used as
is, with no apt call: a machine fetches once and then boots offline.

Which kernel: the one Debian's metapackage `linux-image-cloud-amd64` depends on, i.e. the current
cloud kernel of the release apt is configured for (6.1 on Debian 12). Sorting the names of every
`linux-image-*-cloud-amd64` would pick a different kernel line where the security archive carries
one (Debian 12's security suite also has 6.12), so the metapackage decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from pcihole.boot.elf import ElfError, ElfImage
from pcihole.boot.pvh import PvhError, phys32_entry
from pcihole.host.cache_dir import cache_dir
from pcihole.linux.deb import DebError, list_files, read_member
from pcihole.linux.vmlinuz import VmlinuzError, extract_vmlinux

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATH = "/bin/busybox"
MANIFEST = "manifest.json"
APT_TIMEOUT = 600  # seconds: a download of ~30 MB on a slow mirror


class LinuxFetchError(RuntimeError):
    """The kernel or busybox could not be obtained; one line saying what and why."""


@dataclass(frozen=True)
class CachedFile:
    """One fetched file and where it came from (an entry of the manifest)."""

    path: Path
    package: str
    version: str
    sha256: str


def linux_dir() -> Path:
    return cache_dir() / "linux"


def fetch_kernel(package: str | None = None) -> Path:
    """The cached, PVH-checked ELF vmlinux of the Debian cloud kernel (fetched on first use)."""
    return fetch_kernel_entry(package).path


def fetch_busybox() -> Path:
    """The cached static busybox binary from Debian's busybox-static (fetched on first use)."""
    return fetch_busybox_entry().path


def fetch_kernel_entry(package: str | None = None) -> CachedFile:
    cached = _cached("kernel")
    if cached is not None and (package is None or cached.package == package):
        return cached
    package = package or kernel_package()
    with tempfile.TemporaryDirectory(prefix="pcihole-apt-") as tmp:
        deb_path, version = apt_download(package, Path(tmp))
        deb = deb_path.read_bytes()
        try:
            vmlinuz_paths = [p for p in list_files(deb, deb_path.name) if p.startswith("/boot/vmlinuz-")]
            if not vmlinuz_paths:
                raise LinuxFetchError(f"{package} {version}: the package has no /boot/vmlinuz-*")
            vmlinuz = read_member(deb, vmlinuz_paths[0], deb_path.name)
        except DebError as e:
            raise LinuxFetchError(str(e)) from None
    name = f"{package} {version} {vmlinuz_paths[0]}"
    try:
        vmlinux, _compression = extract_vmlinux(vmlinuz, name)
    except VmlinuzError as e:
        raise LinuxFetchError(str(e)) from None
    check_pvh(vmlinux, name)
    return _store("kernel", f"vmlinux-{package}_{version}", vmlinux, package, version)


def fetch_busybox_entry() -> CachedFile:
    cached = _cached("busybox")
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="pcihole-apt-") as tmp:
        deb_path, version = apt_download(BUSYBOX_PACKAGE, Path(tmp))
        try:
            busybox = read_member(deb_path.read_bytes(), BUSYBOX_PATH, deb_path.name)
        except DebError as e:
            raise LinuxFetchError(str(e)) from None
    if not busybox.startswith(b"\x7fELF"):
        raise LinuxFetchError(f"{BUSYBOX_PACKAGE} {version}: {BUSYBOX_PATH} is not an ELF executable")
    return _store("busybox", f"busybox_{version}", busybox, BUSYBOX_PACKAGE, version, mode=0o755)


def check_pvh(vmlinux: bytes, name: str) -> int:
    """The PVH entry address; LinuxFetchError if the ELF has no XEN_ELFNOTE_PHYS32_ENTRY note."""
    try:
        return phys32_entry(ElfImage(vmlinux, name))
    except (ElfError, PvhError) as e:
        raise LinuxFetchError(str(e)) from None


def kernel_package() -> str:
    """The kernel package Debian's cloud metapackage depends on now, e.g. linux-image-6.1.0-57-cloud-amd64."""
    out = _apt(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", KERNEL_METAPACKAGE], KERNEL_METAPACKAGE
    )
    for line in out.splitlines():
        what, _, dep = line.strip().partition(":")
        dep = dep.strip()
        if (
            what in ("Depends", "|Depends")
            and dep.startswith("linux-image-")
            and dep.endswith("-cloud-amd64")
        ):
            return dep
    raise LinuxFetchError(
        f"apt-cache knows no kernel for {KERNEL_METAPACKAGE} (run apt-get update, on a Debian amd64 host)"
    )


def apt_download(package: str, dest: Path) -> tuple[Path, str]:
    """`apt-get download package` into `dest` (no install); the .deb and its version."""
    _apt(["apt-get", "download", "-q", package], package, cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise LinuxFetchError(f"apt-get download {package} left no .deb")
    # apt names it package_version_arch.deb, the version URL-quoted (an epoch's ":" is "%3a").
    version = unquote(debs[0].name.split("_")[1])
    return debs[0], version


def _apt(argv: list[str], package: str, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise LinuxFetchError(f"{argv[0]} not found: fetching {package} needs Debian's apt")
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C"},
        )
    except subprocess.TimeoutExpired:
        raise LinuxFetchError(f"{' '.join(argv)}: no answer after {APT_TIMEOUT} s") from None
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")] or proc.stderr.splitlines()
        detail = errors[0].removeprefix("E: ").strip() if errors else f"exit status {proc.returncode}"
        raise LinuxFetchError(f"{' '.join(argv)}: {detail} (is {package} in apt's lists? try apt-get update)")
    return proc.stdout


def _read_manifest() -> dict[str, dict[str, str]]:
    try:
        data = json.loads((linux_dir() / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached(key: str) -> CachedFile | None:
    """The manifest's entry for `key` if its file is there with the recorded sha256."""
    entry = _read_manifest().get(key)
    if not isinstance(entry, dict):
        return None
    try:
        path = linux_dir() / entry["file"]
        if not path.is_file() or _sha256(path.read_bytes()) != entry["sha256"]:
            return None
        return CachedFile(path, entry["package"], entry["version"], entry["sha256"])
    except (KeyError, TypeError, OSError):
        return None


def _store(key: str, filename: str, data: bytes, package: str, version: str, mode: int = 0o644) -> CachedFile:
    directory = linux_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / filename
        # Write beside and rename: a reader never sees half a kernel.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        tmp.replace(path)
        digest = _sha256(data)
        manifest = _read_manifest()
        old = manifest.get(key)
        manifest[key] = {"package": package, "version": version, "sha256": digest, "file": filename}
        mtmp = directory / (MANIFEST + ".tmp")
        mtmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        mtmp.replace(directory / MANIFEST)
        if isinstance(old, dict) and old.get("file") not in (None, filename):
            (directory / str(old["file"])).unlink(missing_ok=True)  # the version it replaces
    except OSError as e:
        raise LinuxFetchError(f"cannot write the cache {directory}: {e.strerror or e}") from None
    return CachedFile(path, package, version, digest)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
