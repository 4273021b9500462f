"""The kernel command line pcihole boots Linux with.

The same arguments go to QEMU when it is the peer (`pcihole bench`, the tests), so both boots are
the same boot; what a host needs on top (the machine's host-quirk arguments) is passed in `extra`.
"""

from __future__ import annotations

from collections.abc import Iterable

#: - console=ttyS0: printk and /init's output on COM1, the only console the machine has;
#: - panic=-1: reboot at once on a panic (no 'reboot in N seconds'): the run ends instead of hanging
#:   (QEMU with -no-reboot exits; pcihole ends the run on the reset);
#: - no `quiet`: the PCI core's per-function lines are at KERN_INFO and are Linux's answer where user
#:   space cannot run.
DEFAULT_ARGS: tuple[str, ...] = ("console=ttyS0", "panic=-1")


def kernel_cmdline(extra: Iterable[str] = (), append: str | None = None) -> str:
    """The default arguments, then `extra` (e.g. host quirks), then what the user appended."""
    args = [*DEFAULT_ARGS, *extra]
    if append:
        args.append(append)
    return " ".join(args)
