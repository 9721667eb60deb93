"""Performance benchmarks of issues 6, 36 and 38: throughput and CPU per file, hub
economy at any job length, latency, idle cost, memory, restart and burst, each run
several times; prints one table of medians and ranges against the targets.

Usage: python -m bench.perf [--runs 3] [--only a,b,...] [--scale 1.0] [--work DIR]

Every run starts the emulator and the daemon as separate processes (``bench.harness``)
on loopback ports the kernel picks. Machines here are shared and noisy, so each scenario
reports the median and the min-max over its runs, and a ratio is always computed from
two measurements of the same run. ``--scale`` shrinks the file counts and the hub's job
lengths (the test suite runs everything at a tiny scale as a smoke test; its numbers mean
nothing). A run that fails is reported and left out; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import economy, harness, scenarios
from bench.harness import spread

Scenario = Callable[[scenarios.Context], dict[str, float]]


@dataclass(frozen=True)
class Measure:
    """One row of the table: a measured value of a scenario, its format and its target."""

    key: str
    label: str
    fmt: str = "{:.2f}"
    target: str = ""
    ok: Callable[[float], bool] | None = None


@dataclass(frozen=True)
class Plan:
    """A scenario with what it measures."""

    letter: str
    title: str
    run: Scenario
    measures: list[Measure] = field(default_factory=list)


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda value: value >= limit


def _exactly(wanted: float) -> Callable[[float], bool]:
    return lambda value: value == wanted


def _wait_rows(
    tag: str, label: str, rpf: float | None, p50: float | None, p95: float | None
) -> list[Measure]:
    """Requests per file and hub done → published p50/p95 of one wait mode (targets: None,
    none)."""

    def row(key: str, what: str, fmt: str, limit: float | None) -> Measure:
        if limit is None:
            return Measure(f"{tag}_{key}", f"{label}: {what}", fmt)
        return Measure(f"{tag}_{key}", f"{label}: {what}", fmt, f"≤ {limit:g}", _at_most(limit))

    return [
        row("rpf", "requests per file", "{:.2f}", rpf),
        row("publish_p50", "hub done → published, p50 s", "{:.3f}", p50),
        row("publish_p95", "hub done → published, p95 s", "{:.3f}", p95),
    ]


def _gap_row(tag: str, label: str) -> Measure:
    return Measure(
        f"{tag}_min_poll_gap",
        f"{label}: shortest gap between polls of one job, s",
        "{:.2f}",
        "≥ 1",
        _at_least(1.0),
    )


PLANS = [
    Plan(
        "a",
        "throughput",
        scenarios.throughput,
        [
            Measure("daemon_fps", "daemon, files/s", "{:.1f}", "≥ 100", _at_least(100)),
            Measure("reference_fps", "reference client, files/s", "{:.1f}"),
            Measure("daemon_cpu_ms", "daemon CPU per file, ms", "{:.2f}"),
            Measure("reference_cpu_ms", "reference client CPU per file, ms", "{:.2f}"),
            Measure(
                "cpu_ratio", "daemon / reference CPU per file", "{:.2f}", "≤ 1.5", _at_most(1.5)
            ),
            Measure("reference_drift", "reference CPU, run after / run before", "{:.2f}"),
            Measure("emulator_cpu_ms", "emulator CPU per file (daemon run), ms", "{:.2f}"),
            Measure("processes", "daemon processes while converting", "{:.0f}", "1", _exactly(1)),
            Measure("rss_mb", "daemon peak RSS, MB", "{:.1f}"),
        ],
    ),
    Plan(
        "b",
        "3-8 s jobs",
        economy.short_jobs,
        [
            *_wait_rows("honour", "wait honoured", 4.5, 0.5, 1.5),
            _gap_row("honour", "wait honoured"),
            *_wait_rows("ignore", "wait ignored", None, None, None),
            _gap_row("ignore", "wait ignored"),
            Measure("naive_rpf", "naive 1 s polling, requests per file", "{:.2f}"),
        ],
    ),
    Plan(
        "c",
        "latency",
        scenarios.latency,
        [
            Measure(
                "publish_p50",
                "hub completion → published, p50 s",
                "{:.3f}",
                "≤ 0.5",
                lambda v: v <= 0.5,
            ),
            Measure(
                "publish_p95",
                "hub completion → published, p95 s",
                "{:.3f}",
                "≤ 1.5",
                lambda v: v <= 1.5,
            ),
            Measure(
                "upload_p50",
                "quiet period end → upload, p50 s",
                "{:.3f}",
                "≤ 0.2",
                lambda v: v <= 0.2,
            ),
            Measure(
                "upload_max",
                "quiet period end → upload, max s",
                "{:.3f}",
                "≤ 0.2",
                lambda v: v <= 0.2,
            ),
        ],
    ),
    Plan(
        "d",
        "idle cost",
        scenarios.idle,
        [
            Measure("inotify_cpu_pct", "CPU, inotify, %", "{:.2f}", "≤ 1", lambda v: v <= 1.0),
            Measure("polling_cpu_pct", "CPU, polling every 2 s, %", "{:.2f}"),
        ],
    ),
    Plan(
        "e",
        "memory",
        scenarios.memory,
        [
            Measure("rss_small_mb", "peak RSS, 20 MB in and out, MB", "{:.1f}"),
            Measure(
                "rss_big_mb",
                "peak RSS, 190 MB in and out, MB",
                "{:.1f}",
                "≤ 80",
                _at_most(80),
            ),
            Measure("rss_ratio", "RSS(190 MB) / RSS(20 MB)", "{:.3f}", "≤ 1.2", lambda v: v <= 1.2),
        ],
    ),
    Plan(
        "f",
        "restart",
        scenarios.restart,
        [
            Measure("ready_s", "spawn → READY=1, s", "{:.2f}", "≤ 15", lambda v: v <= 15),
            Measure("uploads", "uploads after the restart", "{:.0f}", "0", lambda v: v == 0),
        ],
    ),
    Plan(
        "g",
        "burst",
        scenarios.burst,
        [
            Measure("completed", "completed", "{:.0f}"),
            Measure("errors", "errors (failed jobs, error files)", "{:.0f}", "0", lambda v: v == 0),
            Measure("rss_mb", "peak RSS, MB", "{:.1f}", "≤ 200", lambda v: v <= 200),
            Measure("fps", "files/s", "{:.1f}"),
        ],
    ),
    Plan(
        "h",
        "30-90 s jobs; a 120/min hub",
        economy.long_jobs,
        [
            *_wait_rows("honour", "wait honoured", 4.5, 2.0, None),
            *_wait_rows("ignore", "wait ignored", 6.0, None, None),
            Measure(
                "limited_refused_pct",
                "120/min hub, 100 files of 3-8 s: refused (429), %",
                "{:.1f}",
                "≤ 5",
                _at_most(5.0),
            ),
            Measure("limited_failed", "120/min hub: failed jobs", "{:.0f}", "0", _exactly(0)),
            Measure("limited_rpf", "120/min hub: requests per file", "{:.2f}"),
            Measure("limited_minutes", "120/min hub: minutes to convert all", "{:.1f}"),
        ],
    ),
    Plan(
        "i",
        "idle with SQLite, 1,500 files known",
        economy.idle_writes,
        [
            Measure("idle_cpu_pct", "daemon CPU, %", "{:.3f}", "≤ 0.15", _at_most(0.15)),
            Measure("idle_kb_per_min", "bytes written per minute, KB", "{:.1f}", "0", _exactly(0)),
        ],
    ),
]


def run_plan(plan: Plan, ctx: scenarios.Context, runs: int) -> list[dict[str, float]]:
    """Run one scenario ``runs`` times; print each run's numbers as they come. Each run's
    folders are removed once it is measured: a full table would otherwise keep tens of
    GB of inputs, outputs and hub copies until its end."""
    results = []
    for number in range(1, runs + 1):
        started = time.monotonic()
        run_ctx = ctx.for_run(f"{plan.letter}{number}")
        try:
            result = plan.run(run_ctx)
        except Exception:  # one failed run must not cost the rest of a long table
            print(f"  ({plan.letter}) run {number}/{runs} FAILED:", flush=True)
            traceback.print_exc(file=sys.stdout)
            continue
        finally:
            shutil.rmtree(run_ctx.work, ignore_errors=True)
        took = time.monotonic() - started
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.items())
        print(f"  ({plan.letter}) run {number}/{runs} in {took:.0f} s: {shown}", flush=True)
        results.append(result)
    return results


def table(rows: list[tuple[Plan, list[dict[str, float]]]], runs: int) -> str:
    """The Markdown table of every measure: median, min-max, target, met."""
    lines = [
        f"| # | measure | median | min-max (n={runs}) | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for plan, results in rows:
        for measure in plan.measures:
            values = [r[measure.key] for r in results if measure.key in r]
            if not values:
                continue
            mid, low, high = spread(values)
            fmt = measure.fmt
            met = "" if measure.ok is None else ("yes" if measure.ok(mid) else "**no**")
            fewer = "" if len(values) == runs else f" (n={len(values)})"
            lines.append(
                f"| {plan.letter} | {plan.title}: {measure.label} | {fmt.format(mid)} | "
                f"{fmt.format(low)}-{fmt.format(high)}{fewer} | {measure.target} | {met} |"
            )
    return "\n".join(lines)


def machine() -> str:
    """One line about where the numbers come from."""
    cpus = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    load = Path("/proc/loadavg").read_text().split()[:3]
    return f"{cpus} CPUs, load average {' '.join(load)} at the end, Python {sys.version.split()[0]}"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="abcdefghi", help="scenario letters, e.g. a,c")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink file counts (smoke)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    parser.add_argument("--profile", type=Path, help="py-spy flame graphs of every process here")
    harness.add_set_option(parser)
    args = parser.parse_args(argv)
    harness.PROFILE_DIR = args.profile
    harness.SETTINGS.update(harness.parse_settings(args.set))
    chosen = [plan for plan in PLANS if plan.letter in args.only]
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ldx-bench-", dir=args.work) as tmp:
        ctx = scenarios.Context(Path(tmp), scale=args.scale)
        rows = []
        for plan in chosen:
            print(f"({plan.letter}) {plan.title}", flush=True)
            rows.append((plan, run_plan(plan, ctx, args.runs)))
    print()
    print(table(rows, args.runs))
    print(f"\n{machine()}")
    if args.json is not None:
        args.json.write_text(json.dumps({p.letter: r for p, r in rows}, indent=1))
    return 0 if all(len(results) == args.runs for _, results in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
