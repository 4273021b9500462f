"""Median, min and max of repeated measurements (the median resists one slow run of a shared host)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        if not samples:
            raise ValueError("no samples to summarise")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def ratio(value: float | None, best: float | None) -> float | None:
    """value / best, where "best" is the smallest of a column; None where it has no meaning
    (a missing value, or a best of 0 under a non-zero value: "infinitely worse" is not a number)."""
    if value is None or best is None:
        return None
    if best == 0:
        return 1.0 if value == 0 else None
    return value / best


def quotient(a: float | None, b: float | None) -> float | None:
    """a / b for two durations; None where either is missing or b is not positive."""
    return None if a is None or b is None or b <= 0 else a / b
