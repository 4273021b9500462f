"""The Linux boots of the selected tests start in the background as soon as collection is done, and the
tests that check them run last (tests/linux/boot_pool.py says why). A test names its boot with
`@pytest.mark.linux_boot(BOOT)` and gets the finished boot from the `linux_boot` fixture; a boot
process still running when the session ends, however it ends, is killed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.linux.boot_pool import Boot, BootOutcome, BootPool

POOL = pytest.StashKey[BootPool]()
#: Why no boot can run here (the kernel cannot be fetched), when none can.
NO_KERNEL = pytest.StashKey[str]()
WORKDIR = pytest.StashKey[Path]()


def boot_of(item: pytest.Item) -> Boot | None:
    marker = item.get_closest_marker("linux_boot")
    return marker.args[0] if marker is not None else None


def skipped(item: pytest.Item) -> bool:
    """The item carries a skip, or a skipif whose condition is true (the suite's skipifs are booleans)."""
    if any(True for _ in item.iter_markers("skip")):
        return True
    return any(bool(m.args[0] if m.args else m.kwargs.get("condition")) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that wait for a boot go last, so the rest of the suite runs while the boots do."""
    items.sort(key=lambda item: boot_of(item) is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    boots = list(dict.fromkeys(b for item in session.items if not skipped(item) and (b := boot_of(item))))
    if boots and (pool := boot_pool(session.config)) is not None:
        # kvm boots first: each takes minutes of CPU on a software KVM, a model boot seconds.
        pool.start(sorted(boots, key=lambda b: b.backend != "kvm"))


def boot_pool(config: pytest.Config) -> BootPool | None:
    """The session's pool, made on first use; None where the kernel cannot be fetched (NO_KERNEL says why)."""
    if POOL in config.stash or NO_KERNEL in config.stash:
        return config.stash.get(POOL, None)
    from pcihole.linux.fetch import LinuxFetchError, fetch_busybox, fetch_kernel
    from pcihole.linux.initramfs import build_initramfs

    try:
        kernel, busybox = fetch_kernel(), fetch_busybox()
    except LinuxFetchError as e:
        config.stash[NO_KERNEL] = f"cannot fetch the Debian cloud kernel: {e}"
        return None
    workdir = Path(tempfile.mkdtemp(prefix="pcihole-linux-boots-"))
    config.stash[WORKDIR] = workdir
    initrd = workdir / "initramfs.cpio"
    initrd.write_bytes(build_initramfs(busybox))
    pool = config.stash[POOL] = BootPool(kernel, initrd, workdir, slots=len(os.sched_getaffinity(0)))
    return pool


def pytest_sessionfinish(session: pytest.Session) -> None:
    pool = session.config.stash.get(POOL, None)
    if pool is not None:
        pool.stop()
        del session.config.stash[POOL]
    workdir = session.config.stash.get(WORKDIR, None)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def linux_boot(request: pytest.FixtureRequest) -> BootOutcome:
    """The finished boot the test's `linux_boot` marker names (waited for; started now if collection
    did not)."""
    boot = boot_of(request.node)
    assert boot is not None, f"{request.node.nodeid} uses linux_boot without a linux_boot marker"
    pool = boot_pool(request.config)
    if pool is None:
        pytest.skip(request.config.stash[NO_KERNEL])
    return pool.outcome(boot)
