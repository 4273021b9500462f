"""`pcihole bench --quick` runs end to end and writes what it promises. Benchmarks are not tests: no
time is asserted here, only that every measurement ran and every output was written."""

from __future__ import annotations

import json
import shutil

import pytest

from pcihole.cli import main
from tests.backends import KVM_UNAVAILABLE

MODEL_STRATEGIES = {"exit", "ro-filled", "ro-alias", "native", "mmio-bus"}
STOCK_KVM_STRATEGIES = {"exit", "ro-filled", "ro-alias"}
TOP_LEVEL_KEYS = {
    "schema",
    "plan",
    "host",
    "tsc",
    "backends",
    "headline",
    "scan",
    "exit_path",
    "exit_vs_qemu",
    "exit_cost",
    "hotplug",
    "scaling",
}
ROW_KEYS = {
    "backend",
    "strategy",
    "scan_seconds",
    "exits",
    "ecam_exits",
    "absent_exits",
    "config_reads",
    "hole_backing_bytes",
    "memslots",
    "ratios",
}
EXIT_COST_ROW_KEYS = {
    "label",
    "run_loop",
    "absent_address",
    "present_address",
    "absent_seconds_per_read",
    "present_seconds_per_read",
    "ram_seconds_per_read",
    "absent_over_qemu",
    "present_over_qemu",
}
PLOT_KINDS = ("scan", "scaling-ecam", "scaling-functions")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_bench_writes_json_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need the 'bench' extra (matplotlib)")
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0

    data = json.loads((tmp_path / "bench.json").read_text())
    assert data.keys() >= TOP_LEVEL_KEYS
    rows = {(r["backend"], r["strategy"]): r for r in data["scan"]["rows"] if r["run_loop_asked"] == "auto"}
    python_loop_rows = [r for r in data["scan"]["rows"] if r["run_loop_asked"] == "python"]
    expected = {("model", s) for s in MODEL_STRATEGIES}
    if KVM_UNAVAILABLE is None:
        expected |= {("kvm", s) for s in STOCK_KVM_STRATEGIES}
        if shutil.which("qemu-system-x86_64"):
            expected.add(("qemu", "exit"))
    assert expected <= rows.keys(), f"missing rows: {expected - rows.keys()}"
    for row in rows.values():
        assert row.keys() >= ROW_KEYS
        assert row["config_reads"] > 8000  # the whole 256-bus segment was probed
    measured = data["backends"]["measured"]
    for backend in measured:
        strategies = {(backend, s) for s in data["backends"]["strategies"][backend]}
        assert {k for k in rows if k[0] == backend} == strategies
        assert {(h["backend"], h["strategy"]) for h in data["hotplug"]} >= strategies
        assert {(p["backend"], p["strategy"]) for p in data["scaling"]} >= strategies
        assert backend in {e["backend"] for e in data["exit_path"]}
        assert backend in data["headline"]
    if KVM_UNAVAILABLE is None:
        # kvm's `exit` again with the Python loop: the same counts as with the default (C) loop
        (python_loop,) = python_loop_rows
        assert (python_loop["backend"], python_loop["strategy"], python_loop["run_loop"]) == (
            "kvm",
            "exit",
            "python",
        )
        c_loop = rows[("kvm", "exit")]
        for key in ("exits", "ecam_exits", "absent_exits", "config_reads", "devices"):
            assert python_loop[key] == c_loop[key], key
        if ("qemu", "exit") in rows:
            # the alternated rounds ran both loops: the default one is the C loop where it builds
            v = data["exit_vs_qemu"]
            assert v["rounds"] >= 1 and v["default_loop"] in ("c", "python")
            assert v["default_loop"] == c_loop["run_loop"]
            # ... and in the same boots the guest timed one config read on each VMM
            cost = data["exit_cost"]
            assert cost["rounds"] == v["rounds"] and cost["reads"] == data["plan"]["exit_loop_reads"]
            assert [(r["label"], r["run_loop"]) for r in cost["rows"]] == [
                ("kvm / exit", c_loop["run_loop"]),
                ("kvm / exit (Python loop)", "python"),
                ("qemu / exit", ""),
            ]
            for r in cost["rows"]:
                assert r.keys() >= EXIT_COST_ROW_KEYS
                assert r["absent_seconds_per_read"]["n"] == cost["rounds"]
            kvm_row, _, qemu_row = cost["rows"]
            assert kvm_row["absent_address"] == 0xE0008000 and kvm_row["present_address"] == 0xE0000000
            assert qemu_row["absent_address"] == 0xB0008000 and qemu_row["present_address"] == 0xB0000000
            assert qemu_row["absent_over_qemu"] == qemu_row["present_over_qemu"] == 1.0
            assert data["headline"]["kvm"]["absent_read_over_qemu"] == kvm_row["absent_over_qemu"]
    else:
        assert python_loop_rows == []
        assert data["exit_cost"] is None
    # Counts, not times: absent functions never exit where the hole is a memslot.
    for (_, strategy), row in rows.items():
        if strategy in ("ro-filled", "ro-alias", "native"):
            assert row["absent_exits"] == 0

    markdown = (tmp_path / "bench.md").read_text()
    assert "## Scan of the default machine" in markdown and "| backend / strategy |" in markdown
    assert "## Exit cost, same guest" in markdown
    pngs = {p.name: p for p in tmp_path.glob("*.png")}
    assert pngs.keys() >= {f"{kind}-{backend}.png" for kind in PLOT_KINDS for backend in measured}
    for name, png in pngs.items():
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({name})" in markdown
    assert not list(tmp_path.glob(".bench-*")), "the staging directory of the results was left behind"
