"""Everything one `pcihole bench` measured, and its JSON form (the file report.py and plots.py read)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pcihole.bench.alias_sweep import AliasSweepRow
from pcihole.bench.configs import Configs
from pcihole.bench.exit_cost import ExitCost
from pcihole.bench.exit_path import ExitPathResult
from pcihole.bench.exit_vs_qemu import ExitVsQemu
from pcihole.bench.headline import Headline
from pcihole.bench.host import HostInfo
from pcihole.bench.hotplug import HotplugResult
from pcihole.bench.linux_boot import LinuxBootRow
from pcihole.bench.plan import BenchPlan
from pcihole.bench.scaling import ScalingPoint
from pcihole.bench.scan import ScanRow
from pcihole.host.tsc import TscClock

SCHEMA = "pcihole-bench/1"


@dataclass
class BenchResults:
    plan: BenchPlan
    host: HostInfo
    clock: TscClock
    configs: Configs
    started: str
    seconds: float = 0.0
    scan: list[ScanRow] = field(default_factory=list)
    #: why the QEMU peer row is missing (None when it is there)
    qemu_skipped: str | None = None
    exit_path: list[ExitPathResult] = field(default_factory=list)
    #: kvm `exit` (both run loops) and QEMU booted in turn (exit_vs_qemu.py); None without QEMU
    exit_vs_qemu: ExitVsQemu | None = None
    #: one config read's cost, timed by the guest in the same boots (exit_cost.py); None without QEMU
    exit_cost: ExitCost | None = None
    #: why the rounds booted in turn (exit_vs_qemu, exit_cost) are missing where the QEMU row is
    #: there: one of their boots failed, pcihole's or QEMU's
    alternated_skipped: str | None = None
    hotplug: list[HotplugResult] = field(default_factory=list)
    scaling: list[ScalingPoint] = field(default_factory=list)
    #: backend -> ro-alias's granule x prefault rows, with their ro-filled floors (alias_sweep.py)
    alias_sweep: dict[str, list[AliasSweepRow]] = field(default_factory=dict)
    headline: dict[str, Headline] = field(default_factory=dict)
    #: the Linux-boot table (`--linux`): whether it was asked for, its rows, and what was left out
    linux_measured: bool = False
    linux: list[LinuxBootRow] = field(default_factory=list)
    linux_skipped: dict[str, str] = field(default_factory=dict)

    def tsc_check(self) -> dict[str, float]:
        """Guest-TSC scan time / host wall time of the whole run, for the `exit` rows (where the scan
        is nearly all of the run): just under 1 when guest TSC ticks and host seconds agree."""
        return {
            r.label: r.scan_seconds.median / r.run_seconds.median
            for r in self.scan
            if r.strategy == "exit" and r.backend != "qemu" and r.run_seconds
        }

    def row(self, backend: str, strategy: str, run_loop: str = "auto") -> ScanRow | None:
        """The scan row of backend / strategy with the run loop asked for ("auto": the default loop)."""
        return next(
            (
                r
                for r in self.scan
                if r.backend == backend and r.strategy == strategy and r.run_loop_asked == run_loop
            ),
            None,
        )

    def as_json(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "started": self.started,
            "seconds": round(self.seconds, 3),
            "plan": self.plan.as_dict(),
            "host": self.host.as_dict(),
            "tsc": {**self.clock.as_dict(), "scan_over_run_wall_time": self.tsc_check()},
            "backends": {
                "measured": self.configs.backends,
                "skipped": self.configs.skipped,
                "strategies": {b: [c.strategy for c in self.configs.of(b)] for b in self.configs.backends},
                "auto": self.configs.auto,
            },
            "headline": {backend: asdict(h) for backend, h in self.headline.items()},
            "scan": {
                "machine": "default (pcihole/machine/default.toml)",
                "rows": [r.as_dict() for r in self.scan],
                "qemu_skipped": self.qemu_skipped,
            },
            "exit_path": [e.as_dict() for e in self.exit_path],
            "exit_vs_qemu": self.exit_vs_qemu.as_dict() if self.exit_vs_qemu else None,
            "exit_cost": self.exit_cost.as_dict() if self.exit_cost else None,
            "alternated_skipped": self.alternated_skipped,
            "hotplug": [h.as_dict() for h in self.hotplug],
            "scaling": [p.as_dict() for p in self.scaling],
            "alias_sweep": {b: [r.as_dict() for r in rows] for b, rows in self.alias_sweep.items()},
            "linux": {
                "measured": self.linux_measured,
                "machine": "default, with at least the RAM Linux needs",
                "rows": [r.as_dict() for r in self.linux],
                "skipped": self.linux_skipped,
            },
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=2) + "\n")
