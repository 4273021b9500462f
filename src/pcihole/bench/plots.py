"""PNG plots of the results (matplotlib, Agg backend: no display needed).

Per backend: the default machine's scan time by strategy (with QEMU beside kvm), and the scaling
curves with the ECAM size and with the number of present functions, each as four panels: scan time,
ECAM exits, hole backing memory and VmPTE growth. Counts that can be 0 use a symmetric-log axis, so a
strategy at 0 sits on the axis instead of vanishing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pcihole.bench.results import BenchResults
from pcihole.bench.scaling import SWEEP_ECAM, SWEEP_FUNCTIONS, ScalingPoint

#: One colour per strategy in every plot.
COLOURS = {
    "exit": "#d62728",
    "ro-filled": "#ff7f0e",
    "ro-alias": "#1f77b4",
    "native": "#2ca02c",
    "mmio-bus": "#9467bd",
    "qemu": "#7f7f7f",
}
#: And one marker, so that strategies whose curves coincide (0 exits, 0 bytes) stay visible.
MARKERS = {"exit": "o", "ro-filled": "s", "ro-alias": "^", "native": "D", "mmio-bus": "v", "qemu": "x"}
SEGMENT_STYLES: dict[int, Any] = {1: "-", 4: "--"}
DPI = 100
#: Colours kept when a plot is written: these are flat line art, and a palette PNG of them is a
#: quarter of the size of matplotlib's RGBA one (they are committed under docs/bench/).
PALETTE_COLOURS = 64


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """Write the figure as a small palette PNG (Pillow comes with matplotlib)."""
    fig.savefig(path, dpi=DPI)
    shrink_png(path)


def shrink_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def scan_bars(results: BenchResults, backend: str, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in results.scan if r.kvm_group == backend]
    labels = [("QEMU (exit)" if r.backend == "qemu" else r.short_label) for r in rows]
    medians = [r.scan_seconds.median * 1e3 for r in rows]
    low = [m - r.scan_seconds.min * 1e3 for m, r in zip(medians, rows, strict=True)]
    high = [r.scan_seconds.max * 1e3 - m for m, r in zip(medians, rows, strict=True)]
    colours = [COLOURS["qemu" if r.backend == "qemu" else r.strategy] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.6))
    ax.barh(labels, medians, xerr=[low, high], color=colours, capsize=3)
    right = max(r.scan_seconds.max * 1e3 for r in rows)
    for y, (m, r) in enumerate(zip(medians, rows, strict=True)):
        exits = "—" if r.ecam_exits is None else f"{r.ecam_exits:,}"
        ax.text(
            r.scan_seconds.max * 1e3 + right * 0.02,
            y,
            f"{m:.1f} ms, {exits} ECAM exits",
            va="center",
            fontsize=8,
        )
    ax.invert_yaxis()
    ax.set_xlim(0, right * 1.5)
    ax.set_xlabel("scan time of the default machine (ms, median; bars: min–max)")
    ax.set_title(f"{backend}: one full ECAM scan (256 buses, 11 functions) by strategy")
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def _series(points: list[ScalingPoint], sweep: str):
    """(strategy, segments) -> sorted points."""
    series: dict[tuple[str, int], list[ScalingPoint]] = {}
    for p in points:
        if p.sweep == sweep:
            series.setdefault((p.row.strategy, p.shape.segments), []).append(p)
    for key in series:
        series[key].sort(key=lambda p: p.shape.ecam_bytes if sweep == SWEEP_ECAM else p.shape.functions)
    return series


PANELS: tuple[tuple[str, Callable[[ScalingPoint], float], str, float], ...] = (
    # (title, value, y scale, linear range of a symlog axis)
    ("scan time (ms, guest TSC)", lambda p: p.row.scan_seconds.median * 1e3, "log", 0),
    ("ECAM exits", lambda p: p.row.ecam_exits or 0, "symlog", 1),
    (
        "hole backing memory (KiB, distinct host pages)",
        lambda p: (p.row.hole_backing_bytes or 0) / 1024,
        "symlog",
        1,
    ),
    # VmPTE moves by a few pages of page tables either way with Python's own allocations: linear up to
    # 64 KiB keeps that noise flat near 0, and a "negative growth" is drawn as 0.
    (
        "host page tables: VmPTE growth (KiB)",
        lambda p: max(p.row.vm_pte_growth_bytes or 0, 0) / 1024,
        "symlog",
        64,
    ),
)


def scaling_plot(results: BenchResults, backend: str, sweep: str, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    series = _series([p for p in results.scaling if p.row.backend == backend], sweep)
    strategies = list(dict.fromkeys(strategy for strategy, _ in series))
    segment_counts = sorted({segments for _, segments in series})
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    all_xs: set[float] = set()
    for ax, (title, value, scale, linthresh) in zip(axes.flat, PANELS, strict=True):
        top = 0.0
        for (strategy, segments), points in series.items():
            xs = [
                p.shape.ecam_bytes / (1 << 20) if sweep == SWEEP_ECAM else p.shape.functions for p in points
            ]
            ys = [value(p) for p in points]
            all_xs.update(xs)
            top = max(top, *ys)
            ax.plot(
                xs,
                ys,
                SEGMENT_STYLES.get(segments, ":"),
                marker=MARKERS.get(strategy, "o"),
                markersize=5,
                alpha=0.85,
                color=COLOURS.get(strategy, "black"),
            )
        ax.set_xscale("log", base=2)
        if scale == "symlog":
            # Linear near 0, so a strategy at 0 sits on the x axis instead of vanishing.
            ax.set_yscale("symlog", linthresh=linthresh)
            top = max(top, linthresh) * 4
            ax.set_ylim(-0.3 * linthresh, top)
            if linthresh > 1:  # keep decade ticks out of the linear part, where they would crowd 0
                ax.yaxis.set_major_locator(
                    FixedLocator([0.0] + [10.0**k for k in range(8) if linthresh < 10.0**k <= top])
                )
        else:
            ax.set_yscale(scale)
            # 1-2-5 steps: a scan-time range within one decade still gets labels.
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("ECAM size (MiB)" if sweep == SWEEP_ECAM else "present functions (one 256-bus segment)")
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(FixedLocator(sorted(all_xs)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{x:g}" for x in sorted(all_xs)])
    handles = [
        Line2D([], [], color=COLOURS.get(s, "black"), marker=MARKERS.get(s, "o"), label=s) for s in strategies
    ]
    if sweep == SWEEP_ECAM and len(segment_counts) > 1:
        handles += [
            Line2D(
                [],
                [],
                color="black",
                linestyle=SEGMENT_STYLES.get(n, ":"),
                label=f"{n} segment{'s' if n > 1 else ''}",
            )
            for n in segment_counts
        ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    what = "the ECAM grows (one host bridge per segment)" if sweep == SWEEP_ECAM else "present functions grow"
    fig.suptitle(f"{backend}: scan cost and hole memory as {what}", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    save(fig, path)
    plt.close(fig)


def write_plots(results: BenchResults, out_dir: Path) -> list[str]:
    """Write every plot into out_dir; returns their file names."""
    names = []
    for backend in results.configs.backends:
        name = f"scan-{backend}.png"
        scan_bars(results, backend, out_dir / name)
        names.append(name)
        for sweep in (SWEEP_ECAM, SWEEP_FUNCTIONS):
            name = f"scaling-{sweep}-{backend}.png"
            scaling_plot(results, backend, sweep, out_dir / name)
            names.append(name)
    return names
