"""Where pcihole keeps what it fetches or builds once: the fetched Linux kernel (linux/fetch.py) and
the compiled C run loop (hv/kvm/c_run_loop.py), each in its own subdirectory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/pcihole, or ~/.cache/pcihole (the XDG base directory default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pcihole"
