"""Which CPU engine the model runs: Unicorn as the wheel ships it, or pcihole's patched build.

bin/build-engine builds Unicorn's pinned sdist with engine/patches/*.patch and puts the library in
place of the wheel's, with a `pcihole-engine` file beside it: the build's key (a hash of the sdist and
the patches) and the patches' names. What each patch changes and why: docs/model-system-cpu.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import unicorn
from unicorn.unicorn_py3.unicorn import uclib

#: The file bin/build-engine writes beside the library it installs.
MARKER = "pcihole-engine"


@dataclass(frozen=True)
class Engine:
    version: str  # Unicorn's version, as its binding reports it
    library: str  # the path of the loaded libunicorn
    key: str | None  # bin/build-engine's key; None: the stock library
    patches: tuple[str, ...]

    @property
    def patched(self) -> bool:
        return self.key is not None

    def describe(self) -> str:
        if self.key is None:
            return f"Unicorn {self.version} ({self.library}: no {MARKER} file beside it, the stock library)"
        names = ", ".join(p.removesuffix(".patch") for p in self.patches)
        return f"Unicorn {self.version} with pcihole's patches ({names}; build {self.key})"


def loaded_engine() -> Engine:
    """The engine this process loaded (LIBUNICORN_PATH, else the installed package's library)."""
    library = Path(uclib._name)
    key: str | None = None
    patches: tuple[str, ...] = ()
    try:
        lines = (library.parent / MARKER).read_text().split()
    except OSError:
        lines = []
    if lines:
        key, patches = lines[0], tuple(lines[1:])
    return Engine(unicorn.__version__, str(library), key, patches)
