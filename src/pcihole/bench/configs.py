"""Which backend x strategy pairs exist on this machine (kvm: exit, ro-filled, ro-alias; the model:
all five), and why a backend is left out when it is. On kvm the `exit` strategy is measured twice:
with the default run loop (the C loop, where it builds) and with the Python loop it stands in for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pcihole.hv import BackendUnavailable, open_backend
from pcihole.memory.strategies import AUTO_ORDER, available_strategies

BACKEND_ORDER = ("kvm", "model")


@dataclass(frozen=True)
class Config:
    backend: str
    strategy: str
    #: build_machine's run_loop: "auto" (the C loop on kvm where it builds) or "python"
    run_loop: str = "auto"

    @property
    def label(self) -> str:
        return f"{self.backend} / {self.strategy}" + (" (Python loop)" if self.run_loop == "python" else "")


@dataclass
class Configs:
    configs: list[Config] = field(default_factory=list)
    #: backend -> why it is not measured
    skipped: dict[str, str] = field(default_factory=dict)
    #: backend -> the strategy "auto" picks there (the headline strategy)
    auto: dict[str, str] = field(default_factory=dict)

    @property
    def backends(self) -> list[str]:
        return [b for b in BACKEND_ORDER if any(c.backend == b for c in self.configs)]

    @property
    def scan_configs(self) -> list[Config]:
        """The scan table's rows: every config, and after kvm's `exit` the same with the Python loop
        (the one strategy whose absent reads exit: the C loop against the loop it stands in for)."""
        out = []
        for c in self.configs:
            out.append(c)
            if c.backend == "kvm" and c.strategy == "exit":
                out.append(Config(c.backend, c.strategy, run_loop="python"))
        return out

    def of(self, backend: str) -> list[Config]:
        return [c for c in self.configs if c.backend == backend]


def discover(backends: Sequence[str] | None) -> Configs:
    """Every strategy of every wanted backend ("auto" or None: all that open here)."""
    wanted = list(BACKEND_ORDER) if not backends or "auto" in backends else list(dict.fromkeys(backends))
    found = Configs()
    for backend in wanted:
        try:
            hv = open_backend(backend)
        except (BackendUnavailable, OSError) as e:
            found.skipped[backend] = str(e)
            continue
        try:
            vm = hv.create_vm()
            try:
                names = available_strategies(hv, vm)
            finally:
                vm.close()
        finally:
            hv.close()
        found.configs += [Config(backend, s) for s in names]
        found.auto[backend] = next(s for s in AUTO_ORDER if s in names)
    return found
