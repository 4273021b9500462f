"""How numbers are written in the markdown table and the plots' labels."""

from __future__ import annotations

_BINARY_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def size(n: int | None) -> str:
    """Bytes the way people read them: 0, 4 KiB, 1.5 MiB, 256 MiB."""
    if n is None:
        return "—"
    for scale, unit in _BINARY_UNITS:
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) or value >= 100 else f"{value:.1f} {unit}"
    return f"{n} B"


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    value = seconds * 1e3
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def us(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e6:.1f} µs"


def duration(seconds: float | None) -> str:
    """µs below a millisecond, ms above."""
    if seconds is None:
        return "—"
    return us(seconds) if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def times(x: float | None) -> str:
    """A ratio: 1.00x, 6.8x, 4096x; a dash where it has no meaning."""
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:,.0f}x"
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def count(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"
