"""The hub economy scenarios of issue 38: requests per file at any job length, whether or
not the hub honours ``?wait``, hub done → published latency, a rate-limited hub, and idling.

(b) 3-8 s jobs and (h) 30-90 s jobs each run two daemons side by side, one against a hub
that honours ``wait`` and one against a hub that ignores it (answers at once); (h) runs a
third against a hub allowing 120 requests a minute, the daemon at its default request
budget. Each daemon has its own emulator, folders and state. At a few requests a second
each they hardly load the machine, and side by side a full table stays within the hour.
(i) leaves a daemon that knows 1,500 files idle and reads its CPU and the bytes it writes.
Job lengths and file counts shrink with ``--scale`` (``Context.jobs``, ``Context.count``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import inputs, state
from bench.harness import (
    Daemon,
    Emulator,
    Folders,
    percentile,
    requests_total,
    settle_disk,
    write_config,
    written_bytes,
)
from bench.scenarios import Context, daemon_folders, job_rows, publish_delays, reference, wait_done
from daemon.emulator.hub import paid_conversions, refused_share

IGNORE_WAIT = ("--wait-mode", "ignore")
POLL_ROUTE = "GET /renderocr/jobs/{job_id}"


@dataclass(frozen=True)
class Setup:
    """One daemon and its emulator in a side-by-side run."""

    name: str
    processing: str  # the emulator's --processing-time
    files: int
    emulator: tuple[str, ...] = ()  # more emulator options
    hub: Mapping[str, Any] = field(default_factory=dict)  # the daemon's [hub] settings


@dataclass(frozen=True)
class Finished:
    """What one daemon of a side-by-side run left: the hub's ledger and the job rows."""

    files: int
    dropped: float  # wall-clock time of the drop
    ledger: dict[str, Any]
    rows: list[dict[str, Any]]
    outbox: Path

    @property
    def requests_per_file(self) -> float:
        """Every API request the hub counted, refused ones included, per input."""
        return requests_total(self.ledger) / self.files

    @property
    def failed(self) -> int:
        """Inputs whose job failed."""
        return sum(row["status"] == "failed" for row in self.rows)

    @property
    def minutes(self) -> float:
        """From the drop to the last input finished, in minutes."""
        ends = [row["finished_at"] for row in self.rows if row["finished_at"]]
        return (max(ends, default=self.dropped) - self.dropped) / 60

    def publish_delays(self) -> list[float]:
        """Seconds from each job's end at the hub to its output's publishing rename."""
        return publish_delays(self.ledger["jobs"], self.rows, self.outbox)

    def summary(self) -> str:
        """One line of what the hub saw, for the progress output."""
        routes = ", ".join(f"{k} {v}" for k, v in sorted(self.ledger["requests"].items()))
        refused = sum(self.ledger["refused"].values())
        paid = paid_conversions(self.ledger)
        return f"{routes}; refused {refused}; paid conversions {paid} for {self.files} files"


@dataclass
class _Run:
    setup: Setup
    ctx: Context
    emulator: Emulator
    daemon: Daemon
    folders: Folders
    staging: Path
    names: list[str]


def side_by_side(ctx: Context, setups: Sequence[Setup], timeout: float) -> dict[str, Finished]:
    """Run every setup at once: start them all, drop every input, wait until every input
    is done or failed; what each left, by setup name."""
    with contextlib.ExitStack() as stack:
        runs = [_start(stack, ctx, setup) for setup in setups]
        for run in runs:
            run.daemon.wait_ready()
        settle_disk()
        dropped = time.time()
        for run in runs:
            inputs.drop(run.staging, run.names, run.folders.inbox)
        deadline = time.monotonic() + timeout
        for run in runs:
            wait_done(run.folders.db, len(run.names), max(1.0, deadline - time.monotonic()))
        ledgers = {run.setup.name: run.emulator.ledger() for run in runs}
    return {
        run.setup.name: Finished(
            len(run.names),
            dropped,
            ledgers[run.setup.name],
            job_rows(run.folders.db),
            run.folders.outbox,
        )
        for run in runs
    }


def _start(stack: contextlib.ExitStack, ctx: Context, setup: Setup) -> _Run:
    own = ctx.for_run(f"{ctx.name}/{setup.name}")
    names = inputs.make_corpus(ctx.corpus, setup.files)
    emulator = stack.enter_context(Emulator(own.work / "emu", setup.processing, *setup.emulator))
    folders, staging = daemon_folders(own, names)
    config = write_config(folders, emulator.url, hub=dict(setup.hub), quiet_period=0.2)
    daemon = stack.enter_context(Daemon(config, folders.root))
    return _Run(setup, own, emulator, daemon, folders, staging, names)


def wait_measures(done: Finished, tag: str) -> dict[str, float]:
    """Requests per file, hub done → published p50/p95 and the shortest poll gap of one
    daemon, keyed ``{tag}_...``."""
    delays = done.publish_delays()
    return {
        f"{tag}_rpf": done.requests_per_file,
        f"{tag}_publish_p50": percentile(delays, 0.5),
        f"{tag}_publish_p95": percentile(delays, 0.95),
        f"{tag}_min_poll_gap": min_poll_gap(done.ledger["events"]),
    }


def min_poll_gap(events: list[dict[str, Any]]) -> float:
    """The shortest time between the starts of two polls of the same job."""
    starts: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event["route"] == POLL_ROUTE:
            starts[event["path"]].append(event["at"])
    gaps = []
    for times in starts.values():
        ordered = sorted(times)
        gaps += [b - a for a, b in itertools.pairwise(ordered)]
    return min(gaps, default=float("inf"))


def _report(done: Mapping[str, Finished]) -> None:
    for name, finished in done.items():
        print(f"      {name}: {finished.summary()}", flush=True)


# -- (b) 3-8 s jobs ------------------------------------------------------------------------


def short_jobs(ctx: Context) -> dict[str, float]:
    """160 files at 3-8 s each, 16 in flight, with ``wait`` honoured and ignored side by
    side; then the reference client polling each job every second, for comparison."""
    files, processing = ctx.count(160), ctx.jobs(3, 8)
    setups = [Setup("honour", processing, files), Setup("ignore", processing, files, IGNORE_WAIT)]
    done = side_by_side(ctx, setups, timeout=900)
    _report(done)
    names = inputs.make_corpus(ctx.corpus, files)
    with Emulator(ctx.work / "emu-naive", processing) as emu:
        reference(emu, ctx, names, naive=True)
        naive = requests_total(emu.ledger())
    measures = wait_measures(done["honour"], "honour") | wait_measures(done["ignore"], "ignore")
    return measures | {"naive_rpf": naive / files}


# -- (h) 30-90 s jobs and a rate-limited hub ---------------------------------------------------


def long_jobs(ctx: Context) -> dict[str, float]:
    """64 files at 30-90 s each, 16 in flight, with ``wait`` honoured and ignored; beside
    them 100 files at 3-8 s against a hub allowing 120 requests a minute, the daemon at
    its default request budget."""
    files, processing = ctx.count(64), ctx.jobs(30, 90)
    limited = Setup(
        "limited",
        ctx.jobs(3, 8),
        ctx.count(100, least=1),
        ("--requests-per-minute", "120"),
        {"max_requests_per_minute": None},  # the daemon's default
    )
    setups = [Setup("honour", processing, files), Setup("ignore", processing, files, IGNORE_WAIT)]
    done = side_by_side(ctx, [*setups, limited], timeout=1800)
    _report(done)
    capped = done["limited"]
    return (
        wait_measures(done["honour"], "honour")
        | wait_measures(done["ignore"], "ignore")
        | {
            "limited_refused_pct": 100 * refused_share(capped.ledger),
            "limited_failed": float(capped.failed),
            "limited_rpf": capped.requests_per_file,
            "limited_minutes": capped.minutes,
        }
    )


# -- (i) idle with SQLite -------------------------------------------------------------------


def idle_writes(ctx: Context) -> dict[str, float]:
    """1,500 completed rows and kept files in SQLite, nothing new: the daemon's CPU and
    the bytes it writes over two minutes, once its start-up work is over."""
    count = ctx.count(1500, least=50)
    seconds = ctx.seconds(120.0, 1.0)
    folders = state.populate(Folders(ctx.work / "daemon").make(), count)
    with Emulator(ctx.work / "emu", "0") as emu:
        config = write_config(folders, emu.url)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            time.sleep(ctx.seconds(10.0, 0.5))  # let the start-up work settle
            cpu0, written0, wall0 = daemon.cpu(), written_bytes(daemon.pid), time.monotonic()
            time.sleep(seconds)
            cpu, written = daemon.cpu() - cpu0, written_bytes(daemon.pid) - written0
            wall = time.monotonic() - wall0
        uploads = len(emu.ledger()["uploads"])
    if uploads:
        raise AssertionError(f"idle daemon uploaded {uploads} files")
    return {"idle_cpu_pct": cpu / wall * 100, "idle_kb_per_min": written / 1024 / (wall / 60)}
