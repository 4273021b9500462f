"""The committed scan.elf is reproducibly built from the sources next to it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from pcihole.guest import IMAGE_PATH, build


def _toolchain_or_skip() -> str:
    if not shutil.which("gcc") or not shutil.which("ld"):
        pytest.skip("gcc and ld are needed to build the guest")
    probe = subprocess.run(
        ["gcc", "-m32", "-ffreestanding", "-nostdlib", "-c", "-x", "c", "-o", "/dev/null", "-"],
        input="int x;",
        text=True,
        capture_output=True,
    )
    if probe.returncode:
        pytest.skip(f"gcc cannot compile for -m32 here: {probe.stderr.strip()}")
    return build.toolchain()


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory) -> tuple[bytes, bytes]:
    _toolchain_or_skip()
    d = tmp_path_factory.mktemp("guest")
    a = build.build(d / "a.elf")
    b = build.build(d / "b.elf")
    assert (d / "a.elf").read_bytes() == a
    return a, b


def test_two_builds_are_identical(two_builds):
    a, b = two_builds
    assert a[:4] == b"\x7fELF"
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()


def test_build_has_no_ident_or_build_id(two_builds):
    a, _ = two_builds
    assert b".comment" not in a
    assert b"GNU\0" not in a  # no NT_GNU_BUILD_ID / property notes
    assert b"/tmp/" not in a and str(build.GUEST_DIR).encode() not in a  # no build paths


def test_committed_image_matches_sources(two_builds):
    recorded = build.TOOLCHAIN_FILE.read_text()
    current = build.toolchain()
    if recorded != current:
        pytest.skip(f"scan.elf was built with\n{recorded}but this machine has\n{current}")
    assert two_builds[0] == IMAGE_PATH.read_bytes(), "scan.elf is stale: run `python -m pcihole.guest.build`"


def test_check_command_agrees(two_builds):
    if build.TOOLCHAIN_FILE.read_text() != build.toolchain():
        pytest.skip("different toolchain than the committed image's")
    assert build.main(["--check"]) == 0


def test_image_is_small():
    assert IMAGE_PATH.stat().st_size < 64 * 1024
