"""Hole strategies: how a hole is made to read as fill bytes (docs/design.md, "Strategies").

`make_strategy(name, hypervisor, vm)` builds one by name; "auto" picks native > ro-alias > exit,
the first the backend can express and that can implement the holes it is given (native cannot
fill with anything but 0xff). Asking for one the backend cannot do raises
`StrategyUnavailable` naming what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pcihole.memory.strategies.base import (
    DEFAULT_TUNING,
    HoleLayout,
    HoleStrategy,
    HoleTuning,
    SlotSpec,
    StrategyUnavailable,
)
from pcihole.memory.strategies.exit import ExitStrategy
from pcihole.memory.strategies.mmio_bus import MmioBusStrategy
from pcihole.memory.strategies.native import NativeStrategy
from pcihole.memory.strategies.ro_alias import RoAliasStrategy
from pcihole.memory.strategies.ro_filled import RoFilledStrategy

if TYPE_CHECKING:
    from pcihole.hv.interface import Hypervisor, Vm
    from pcihole.memory.region import Hole

STRATEGIES: dict[str, type[HoleStrategy]] = {
    s.name: s for s in (ExitStrategy, RoFilledStrategy, RoAliasStrategy, NativeStrategy, MmioBusStrategy)
}
STRATEGY_NAMES = ("auto", *STRATEGIES)
AUTO_ORDER = ("native", "ro-alias", "exit")


def resolve_strategy(
    name: str, hypervisor: Hypervisor, vm: Vm, holes: Sequence[Hole] = ()
) -> type[HoleStrategy]:
    """The strategy class for `name` on this backend, or StrategyUnavailable saying what is missing.
    "auto" skips any strategy that cannot implement `holes` (the holes the machine will have)."""
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            cls = STRATEGIES[candidate]
            reason = cls.missing(hypervisor, vm) or cls.cannot_do(holes)
            if reason is None:
                return cls
            reasons.append(reason)
        raise StrategyUnavailable(f"no strategy can do this machine: {'; '.join(reasons)}")
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGY_NAMES)}") from None
    reason = cls.missing(hypervisor, vm)
    if reason is not None:
        raise StrategyUnavailable(reason)
    return cls


def available_strategies(hypervisor: Hypervisor, vm: Vm) -> list[str]:
    return [name for name, cls in STRATEGIES.items() if cls.missing(hypervisor, vm) is None]


def make_strategy(
    name: str,
    hypervisor: Hypervisor,
    vm: Vm,
    *,
    map_budget: int | None = None,
    holes: Sequence[Hole] = (),
    tuning: HoleTuning = DEFAULT_TUNING,
) -> HoleStrategy:
    return resolve_strategy(name, hypervisor, vm, holes)(hypervisor, vm, map_budget=map_budget, tuning=tuning)


__all__ = [
    "DEFAULT_TUNING",
    "AUTO_ORDER",
    "ExitStrategy",
    "HoleLayout",
    "HoleStrategy",
    "HoleTuning",
    "MmioBusStrategy",
    "NativeStrategy",
    "RoAliasStrategy",
    "RoFilledStrategy",
    "STRATEGIES",
    "STRATEGY_NAMES",
    "SlotSpec",
    "StrategyUnavailable",
    "available_strategies",
    "make_strategy",
    "resolve_strategy",
]
