"""The markdown report: headline, the default machine's scan table, exit path, hot-plug, scaling."""

from __future__ import annotations

from pcihole.bench import units
from pcihole.bench.exit_path import STEPS
from pcihole.bench.results import BenchResults
from pcihole.bench.scaling import SWEEP_ECAM, SWEEP_FUNCTIONS
from pcihole.machine.serial import COM1_BASE, UART_REGISTERS


def host_lines(results: BenchResults) -> list[str]:
    h, c = results.host, results.clock
    reference = f", /proc/cpuinfo says {c.cpuinfo_hz / 1e6:.0f} MHz" if c.cpuinfo_hz else ""
    check = ", ".join(f"{label} {x:.3f}" for label, x in results.tsc_check().items())
    check_text = f"; guest-TSC scan time / host wall time of the run: {check}" if check else ""
    load = []
    if h.load_at_start is not None and h.load_at_end is not None:
        shared = (
            "other processes shared the CPUs: compare ratios and counts from this run, not absolute times"
            if max(h.load_at_start, h.load_at_end) > h.cpus / 2
            else "the CPUs were nearly idle"
        )
        load = [
            f"- load average (1 min): {h.load_at_start:.1f} at the start, {h.load_at_end:.1f} at the end; {shared}"
        ]
    return [
        f"- CPU: {h.cpu_model} ({h.cpus} CPUs); kernel {h.kernel}; KVM: {h.kvm_flavour}",
        f"- TSC: {c.hz / 1e6:.1f} MHz ({c.source}{reference}){check_text}",
        f"- Python {h.python}; QEMU {h.qemu or 'not installed'}",
        *([f"- the model's CPU engine: {h.model_engine}"] if h.model_engine else []),
        f"- plan: {results.plan.name} ({results.plan.scan_runs} boots per row, {results.plan.scaling_runs} per "
        f"scaling point); run started {results.started}, took {results.seconds:.0f} s",
        *load,
    ]


def headline_lines(results: BenchResults) -> list[str]:
    lines = []
    for backend, h in results.headline.items():
        absent = ", ".join(f"{s} {n}" for s, n in h.absent_function_exits.items()) or "—"
        lines.append(
            f"- **{backend}** (best strategy `{h.best_strategy}`): exits for absent functions: {absent} (target 0)"
        )
        memory = h.hole_memory_256_bus_segment
        if memory:
            lines.append(
                f"  - hole memory for a 256-bus segment: ro-alias {units.size(memory.ro_alias_bytes)} against "
                f"ro-filled {units.size(memory.ro_filled_bytes)}: {units.times(memory.times_less)} less "
                f"(target ≥ 256x); VmPTE growth {units.size(memory.ro_alias_vm_pte_growth_bytes)} against "
                f"{units.size(memory.ro_filled_vm_pte_growth_bytes)}; "
                f"{units.count(memory.ro_alias_host_mappings)} host mappings"
            )
        parts = [
            f"{units.ms(h.best_scan_seconds)} ms",
            f"{units.times(h.speedup_over_exit)} faster than `exit`",
        ]
        if backend == "kvm":
            parts.append(f"{units.times(h.speedup_over_qemu)} faster than QEMU")
        parts.append(f"{units.times(h.ratio_to_floor)} the floor (ro-filled)")
        lines.append(f"  - full scan with `{h.best_strategy}`: " + ", ".join(parts))
        if h.exit_path_ratio is not None or h.run_loop_ratio is not None:
            lines.append(
                f"  - one exit through pcihole's Python run loop costs {units.times(h.run_loop_ratio)} a bare "
                f"Python KVM_RUN loop's in the same process ({units.times(h.exit_path_ratio)} derived from "
                "the scans)"
            )
        if h.c_run_loop_ratio is not None:
            lines.append(
                f"  - one absent-function read through the run loop with the C loop costs "
                f"{units.times(h.c_run_loop_ratio)} a bare C loop's, {units.times(h.c_run_loop_over_python_bare)} "
                "a bare Python loop's"
            )
        if h.exit_over_qemu is not None:
            bare = (
                f"; a Python loop that only re-enters KVM_RUN would take {units.times(h.bare_loop_over_qemu)}"
                if h.bare_loop_over_qemu is not None
                else ""
            )
            python_loop = (
                f" ({units.times(h.exit_python_loop_over_qemu)} with the Python loop)"
                if h.exit_python_loop_over_qemu is not None
                else ""
            )
            lines.append(
                f"  - the `exit` strategy's scan takes {units.times(h.exit_over_qemu)} QEMU's on this host"
                f"{python_loop}{bare}"
            )
        if h.exit_over_qemu_alternated is not None:
            lines.append(
                f"  - booted in turn with QEMU: the `exit` scan takes {units.times(h.exit_over_qemu_alternated)} "
                f"QEMU's ({units.times(h.exit_python_loop_over_qemu_alternated)} with the Python loop)"
            )
        if h.absent_read_over_qemu is not None:
            lines.append(
                f"  - one config read with `exit`, timed by the same guest on both: an absent function's costs "
                f"{units.times(h.absent_read_over_qemu)} QEMU's, a present function's "
                f"{units.times(h.present_read_over_qemu)} (target ≤ 1.0x)"
            )
    return lines


def scan_table(results: BenchResults) -> list[str]:
    lines = [
        "| backend / strategy | scan ms, median [min–max] | × best | exits: mmio r / w / io / total | ECAM exits "
        "| absent-function exits | config reads | hole backing | memslots | VmPTE growth | host faults in the run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.scan:
        s = r.scan_seconds
        if r.exits:
            e = r.exits
            exits = f"{e['mmio_read']} / {e['mmio_write']} / {e['io']} / {e['total']}"
        else:
            exits = "—"
        lines.append(
            f"| {r.label} | {units.ms(s.median)} [{units.ms(s.min)}–{units.ms(s.max)}] "
            f"| {units.times(r.ratios.get('scan_seconds'))} | {exits} | {units.count(r.ecam_exits)} "
            f"| {units.count(r.absent_exits)} | {units.count(r.config_reads)} | {units.size(r.hole_backing_bytes)} "
            f"| {units.count(r.memslots)} | {units.size(r.vm_pte_growth_bytes)} | {units.count(r.host_faults)} |"
        )
    notes = [f"- `{r.label}`: {r.note}" for r in results.scan if r.note]
    if results.qemu_skipped:
        notes.append(f"- no QEMU row: {results.qemu_skipped}")
    return lines + ([""] + notes if notes else [])


RATIO_COLUMNS = {
    "scan_seconds": "scan time",
    "exits_total": "exits",
    "ecam_exits": "ECAM exits",
    "absent_exits": "absent-function exits",
    "hole_backing_bytes": "hole backing",
    "memslots": "memslots",
}


def ratio_table(results: BenchResults) -> list[str]:
    lines = [
        "| backend / strategy | " + " | ".join(RATIO_COLUMNS.values()) + " |",
        "|---" * (len(RATIO_COLUMNS) + 1) + "|",
    ]
    for r in results.scan:
        lines.append(
            f"| {r.label} | " + " | ".join(units.times(r.ratios.get(f)) for f in RATIO_COLUMNS) + " |"
        )
    lines += ["", "— : not measured, or the best is 0 and this row is not (no finite ratio)."]
    return lines


def exit_path_table(results: BenchResults) -> list[str]:
    lines = [
        "| backend | bare Python KVM_RUN loop, per exit | pcihole `exit` strategy (default run loop), per "
        "dispatched ECAM exit | ratio |",
        "|---|---|---|---|",
    ]
    for e in results.exit_path:
        lines.append(
            f"| {e.backend} | {units.us(e.bare_seconds_per_exit)} | {units.us(e.pcihole_seconds_per_exit)} "
            f"| {units.times(e.ratio)} |"
        )
    breakdowns = [e.breakdown for e in results.exit_path if e.breakdown is not None]
    if breakdowns:
        lines += [
            "",
            "Where one exit through pcihole goes, by step (host clock, per exit, median of runs alternated "
            "with the bare loop in one process). The steps' sum includes the step timers' own cost; the run "
            "loop column is the same reads through the machine's run loop with no timer inside, and its ratio "
            "to the bare loop is what pcihole adds to an exit:",
            "",
            "| backend | "
            + " | ".join(STEPS)
            + " | steps' sum | run loop, untimed | bare loop | run loop / bare |",
            "|---|" + "---|" * (len(STEPS) + 4),
        ]
        for b in breakdowns:
            steps = " | ".join(units.us(b.steps.get(s)) for s in STEPS)
            lines.append(
                f"| {b.backend} | {steps} | {units.us(b.total)} | {units.us(b.run_loop_seconds_per_exit)} "
                f"| {units.us(b.bare_seconds_per_exit)} | {units.times(b.run_loop_ratio)} |"
            )
        lines += [
            "",
            "The same reads through each loop, per exit (host clock, the same runs alternated): bare, the "
            "loop alone (Python: KVM_RUN, decode, a constant; C: hv/kvm/run_loop.c answering from its table); "
            "through pcihole, the machine's run loop with its handler, counting and table:",
            "",
            "| backend | bare Python loop | bare C loop | run loop, Python | run loop, C | Python / bare Python "
            "| C / bare C | C / bare Python |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for b in breakdowns:
            lines.append(
                f"| {b.backend} | {units.us(b.bare_seconds_per_exit)} | {units.us(b.c_bare_seconds_per_exit)} "
                f"| {units.us(b.run_loop_seconds_per_exit)} | {units.us(b.c_run_loop_seconds_per_exit)} "
                f"| {units.times(b.run_loop_ratio)} | {units.times(b.c_run_loop_ratio)} "
                f"| {units.times(b.c_run_loop_over_python_bare)} |"
            )
        lines += [f"- no C loop on {b.backend}: {b.c_skipped}" for b in breakdowns if b.c_skipped]
    v = results.exit_vs_qemu
    if v is None and results.alternated_skipped:
        lines += [
            "",
            f"The `exit` scan against QEMU's, booted in turn: not measured, {results.alternated_skipped}.",
        ]
    if v is not None:
        lines += [
            "",
            f"The `exit` scan against QEMU's, booted in turn ({v.rounds} rounds of one boot each; "
            "the ratio is the median of each round's):",
            "",
            "| kvm / exit, default loop | kvm / exit, Python loop | qemu / exit | default / QEMU | Python / QEMU |",
            "|---|---|---|---|---|",
            f"| {units.ms(v.default_loop_seconds.median)} ms ({v.default_loop} loop) "
            f"| {units.ms(v.python_loop_seconds.median)} ms | {units.ms(v.qemu_seconds.median)} ms "
            f"| {units.times(v.default_loop_over_qemu)} | {units.times(v.python_loop_over_qemu)} |",
        ]
    return lines


def exit_cost_table(results: BenchResults) -> list[str]:
    c = results.exit_cost
    if c is None:
        return [f"Not measured: {results.alternated_skipped or results.qemu_skipped or 'no QEMU'}."]
    lines = [
        f"{c.rounds} rounds of one boot each, {units.count(c.reads)} reads of each kind per boot; per read, "
        "median [min–max] over the rounds; × QEMU is the median of each round's ratio:",
        "",
        "| VMM / strategy | absent function, per read | × QEMU | present function, per read | × QEMU "
        "| RAM loop, per iteration | run loop | absent / present address |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in c.rows:
        a, p, m = r.absent_seconds_per_read, r.present_seconds_per_read, r.ram_seconds_per_read
        lines.append(
            f"| {r.label} | {units.us(a.median)} [{units.us(a.min)}–{units.us(a.max)}] "
            f"| {units.times(r.absent_over_qemu)} | {units.us(p.median)} [{units.us(p.min)}–{units.us(p.max)}] "
            f"| {units.times(r.present_over_qemu)} | {units.us(m.median)} | {r.run_loop or '—'} "
            f"| {r.absent_address:#x} / {r.present_address:#x} |"
        )
    return lines


def hotplug_table(results: BenchResults) -> list[str]:
    lines = [
        "| backend / strategy | absent writes: policy, exits each | punch: memslot create / delete | "
        "other ioctls | wall, median | fill: memslot create / delete | other ioctls | wall, median | "
        "slowest ioctl (punch) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in results.hotplug:
        p, f = h.punch, h.fill
        slowest = max(p.ioctl_seconds.items(), key=lambda kv: kv[1], default=None)
        slowest_text = f"{slowest[0]} {units.duration(slowest[1])}" if slowest else "—"
        lines.append(
            f"| {h.backend} / {h.strategy} | {h.writes}, {h.exits_per_absent_write} "
            f"| {p.memslot_creates} / {p.memslot_deletes} | {_ops(p.other_ops)} "
            f"| {units.duration(p.seconds.median)} | {f.memslot_creates} / {f.memslot_deletes} | {_ops(f.other_ops)} "
            f"| {units.duration(f.seconds.median)} | {slowest_text} |"
        )
    return lines


def alias_sweep_table(results: BenchResults) -> list[str]:
    if not results.alias_sweep:
        return ["Not measured: no backend here has ro-alias."]
    lines = [
        "| backend / strategy | granule | prefault | scan ms, median | × ro-filled (same prefault) "
        "| host faults in the run | build ms, median | hole backing | hole mappings | memslots | VmPTE growth |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rows in results.alias_sweep.values():
        for a in rows:
            r = a.row
            build = r.build_seconds.median if r.build_seconds else None
            lines.append(
                f"| {r.label} | {units.size(a.granule) if a.granule else '—'} | {'on' if a.prefault else 'off'} "
                f"| {units.ms(r.scan_seconds.median)} | {units.times(a.ratio_to_floor)} | {units.count(r.host_faults)} "
                f"| {units.ms(build)} | {units.size(r.hole_backing_bytes)} | {units.count(r.hole_mappings)} "
                f"| {units.count(r.memslots)} | {units.size(r.vm_pte_growth_bytes)} |"
            )
    return lines


def _ops(ops: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in ops.items()) or "—"


def scaling_table(results: BenchResults, sweep: str) -> list[str]:
    lines = [
        "| backend / strategy | functions | segments x buses | ECAM | scan ms | config reads | ECAM exits "
        "| absent exits | hole backing | VmPTE growth | hole mappings | memslots |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in (p for p in results.scaling if p.sweep == sweep):
        shape, r = p.shape, p.row
        lines.append(
            f"| {r.label} | {shape.functions} | {shape.segments} x {shape.buses} | {units.size(shape.ecam_bytes)} "
            f"| {units.ms(r.scan_seconds.median)} | {units.count(r.config_reads)} | {units.count(r.ecam_exits)} "
            f"| {units.count(r.absent_exits)} | {units.size(r.hole_backing_bytes)} | {units.size(r.vm_pte_growth_bytes)} "
            f"| {units.count(r.hole_mappings)} | {units.count(r.memslots)} |"
        )
    return lines


def _is_com1(port: int) -> bool:
    return COM1_BASE <= port < COM1_BASE + UART_REGISTERS


def linux_table(results: BenchResults) -> list[str]:
    if not results.linux_measured:
        return ["Not measured: run `pcihole bench --linux` (a boot takes minutes on a software KVM)."]
    lines = [
        "| backend / strategy | boot to /init | run | exits: mmio r / w / io / total | of which COM1 "
        "| ECAM reads (exits) | absent-function exits | functions | list from | ended |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.linux:
        e = r.exits
        exits = f"{e['mmio_read']} / {e['mmio_write']} / {e['io']} / {e['total']}" if e else "—"
        boot = "—" if r.boot_seconds is None else f"{r.boot_seconds:.2f} s"
        console = None
        if r.io_by_port is not None:
            console = sum(n for port, n in r.io_by_port.items() if _is_com1(int(port, 16)))
        lines.append(
            f"| {r.label} | {boot} | {r.run_seconds:.1f} s | {exits} | {units.count(console)} "
            f"| {units.count(r.ecam_reads)} | {units.count(r.absent_exits)} | {r.devices} | {r.source} | {r.ended} |"
        )
    notes = [f"- `{r.label}`: {r.note}" for r in results.linux if r.note]
    notes += [f"- no `{what}` row: {why}" for what, why in results.linux_skipped.items()]
    notes += model_against_tcg(results)
    return lines + ([""] + notes if notes else [])


def model_against_tcg(results: BenchResults) -> list[str]:
    """Each model row's boot to /init against QEMU TCG's in the same run (target: within 3x)."""
    tcg = next((r for r in results.linux if r.backend == "qemu" and r.strategy == "tcg"), None)
    if tcg is None or not tcg.boot_seconds:
        return []
    engine = f" (engine: {results.host.model_engine})" if results.host.model_engine else ""
    return [
        f"- `{r.label}` to /init: {r.boot_seconds / tcg.boot_seconds:.1f}x QEMU TCG's (target 3x){engine}"
        for r in results.linux
        if r.backend == "model" and r.boot_seconds is not None
    ]


def markdown(results: BenchResults, plots: list[str]) -> str:
    skipped = [f"- backend {b} not measured: {why}" for b, why in results.configs.skipped.items()]
    sections = [
        ["# pcihole bench", "", *host_lines(results), *skipped],
        ["## Headline", "", *headline_lines(results)],
        [
            "## Scan of the default machine",
            "",
            "The scan guest probes the default machine's 256-bus segment the way Linux does. Scan time is the "
            "guest's own TSC count around the scan (the same on QEMU), converted with the TSC frequency above; "
            "× best is the ratio to the fastest row on the same KVM (QEMU runs on /dev/kvm). "
            "Absent-function exits are exits that landed in a hole page.",
            "",
            *scan_table(results),
        ],
        ["### Every figure's ratio to the best row on the same KVM", "", *ratio_table(results)],
        [
            "## Exit path",
            "",
            "A tiny guest reads an address with no memslot; the host only re-enters KVM_RUN (bare loop). "
            "pcihole's figure is (`exit` scan − `ro-filled` scan) / the extra ECAM exits.",
            "",
            *exit_path_table(results),
        ],
        [
            "## Exit cost, same guest",
            "",
            "The same boots as the `exit` scan against QEMU's, booted in turn (the last table above): after "
            "its timed scan the guest reads offset 0 of the first absent function it found N times, of the "
            "first present one (the host bridge 00:00.0) N times and a RAM word N times "
            "(`pcihole.exitloop=N`), each loop timed by its TSC. Every config read is one exit on both VMMs, "
            "so (config-read ticks − RAM ticks) / N is one exit's round trip as the guest sees it, the "
            "scan's own work left out. The run loop column is the loop pcihole ran (docs/run-loop.md says "
            "which exits each answers).",
            "",
            *exit_cost_table(results),
        ],
        [
            "## Hot-plug: one function's ECAM page punched (hot-add) and filled (hot-remove)",
            "",
            *hotplug_table(results),
        ],
        [
            "## ro-alias: alias granule and prefault (default machine)",
            "",
            "The granule is the fill memfd one alias mapping repeats; prefault fills the host page tables of "
            "the hole backing when it is mapped, so that the guest's first touch of a hole page costs no host "
            "page fault (the default is prefault on, granule chosen by the planner: 64 KiB). Host faults are the "
            "process's minor faults during the run; the build includes mapping and prefaulting the backing.",
            "",
            *alias_sweep_table(results),
        ],
        ["## Scaling with the ECAM (one host bridge per segment)", "", *scaling_table(results, SWEEP_ECAM)],
        [
            "## Scaling with present functions (one 256-bus segment)",
            "",
            *scaling_table(results, SWEEP_FUNCTIONS),
        ],
    ]
    sections.append(
        [
            "## Linux boot (the Debian cloud kernel with pcihole's initramfs, default machine)",
            "",
            "Linux's own PCI core enumerates the machine through MCFG. ECAM reads are those that reached the "
            "VMM as exits (with `exit`, all of Linux's; with a hole strategy, only present functions'). Boot to "
            "/init is the host's clock from the start of the guest to the kernel's 'Run /init' line. Each row "
            "checked that Linux listed exactly the machine's functions.",
            "",
            *linux_table(results),
        ]
    )
    if plots:
        sections.append(["## Plots", "", *[f"![{name}]({name})" for name in plots]])
    return "\n\n".join("\n".join(s) for s in sections) + "\n"
