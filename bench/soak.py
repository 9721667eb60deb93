"""Soak: steady work with hub faults and SIGKILLs at a low rate; resources must stay flat.

Usage: python -m bench.soak [--minutes 60] [--rate 2] [--kill-every 300] [--seed 1]

The reliability plan's T18 in a form that fits an afternoon (its 24 h run is the same
command with ``--minutes 1440``). The emulator and the daemon run as subprocesses; files
of about 20 KB arrive in the inbox at ``--rate`` per second (converted inputs are
deleted, as in an office that keeps only the outputs); the hub answers a few per cent of
requests with 5xx, 429 or a cut connection; about every ``--kill-every`` seconds the
daemon is killed with SIGKILL and started again. Every few seconds the bench samples
the daemon's RSS and open descriptors, the state file's size and the age of the oldest
unfinished job. At the end the arrivals stop, the daemon finishes, and the bench checks
that every input completed once, then prints one table: the slopes of RSS and
descriptors over the longest life of one daemon process (least squares, after a
warm-up), the state file's bytes per job, and the oldest unfinished age. The
allocator's own warm-up lasts a few thousand files (RSS rises by about 10 MB, then stays
level while Python's live memory stays flat), so a run shorter than an hour at 2 files/s
still shows it in the RSS slope.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import random
import signal
import sqlite3
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path

from bench import harness
from bench.inputs import FORMATS, SUFFIX, make_input

SAMPLE_EVERY = 2.0  # seconds between samples
WARM_UP = 20.0  # seconds of a daemon's life left out of its slopes
FAULTS = {"error_rate": 0.02, "rate_limit_rate": 0.01, "retry_after": 1.0, "drop_rate": 0.01}
HEALTHY = {"error_rate": 0.0, "rate_limit_rate": 0.0, "drop_rate": 0.0}


@dataclass(frozen=True)
class Sample:
    """One look at the daemon and its state file."""

    life: int  # which daemon process (0 = the first; each kill starts a new one)
    age: float  # seconds since this process started
    rss: int
    fds: int
    db_bytes: int
    oldest_unfinished: float  # seconds; 0 when nothing waits


@dataclass
class Result:
    """What a soak run measured."""

    seconds: float
    files: int
    completed: int
    failed: int
    kills: int
    remote_jobs: int
    db_bytes: int = 0  # the state file with its WAL, at the end
    samples: list[Sample] = field(default_factory=list)

    def slopes(self) -> tuple[float, float, float]:
        """(RSS MB per hour, descriptors per hour, seconds observed) over the longest life."""
        lives: dict[int, list[Sample]] = {}
        for sample in self.samples:
            if sample.age >= WARM_UP:
                lives.setdefault(sample.life, []).append(sample)
        longest = max(lives.values(), key=len, default=[])
        if len(longest) < 3:
            return float("nan"), float("nan"), 0.0
        ages = [s.age for s in longest]
        rss = slope(ages, [s.rss / harness.MiB for s in longest]) * 3600
        fds = slope(ages, [float(s.fds) for s in longest]) * 3600
        return rss, fds, ages[-1] - ages[0]

    def table(self) -> str:
        """The report."""
        rss_slope, fd_slope, observed = self.slopes()
        peak_rss = max((s.rss for s in self.samples), default=0) / harness.MiB
        max_fds = max((s.fds for s in self.samples), default=0)
        oldest = max((s.oldest_unfinished for s in self.samples), default=0.0)
        per_job = self.db_bytes / max(self.completed, 1)
        rows = [
            ("run", f"{self.seconds / 60:.1f} min, {self.files} files, {self.kills} SIGKILLs"),
            (
                "outcome",
                f"{self.completed} completed, {self.failed} failed, "
                f"{self.remote_jobs} remote jobs (bound {self.files + self.kills})",
            ),
            (
                "RSS",
                f"peak {peak_rss:.1f} MB; slope {rss_slope:+.2f} MB/h "
                f"over {observed / 60:.1f} min of one process",
            ),
            ("descriptors", f"max {max_fds}; slope {fd_slope:+.1f} per hour"),
            ("state file", f"{per_job:.0f} bytes per job"),
            ("oldest unfinished", f"{oldest:.1f} s at most"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ys over xs (0 when xs do not vary)."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def _state(db: Path, now: float) -> tuple[int, float]:
    """(state file bytes with its WAL, age of the oldest unfinished job)."""
    size = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    if not db.exists():
        return size, 0.0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        try:
            row = conn.execute(
                "SELECT MIN(created_at) FROM jobs WHERE status IN ('queued', 'processing')"
            ).fetchone()
        except sqlite3.OperationalError:  # not created yet
            return size, 0.0
    return size, (now - row[0]) if row and row[0] is not None else 0.0


def _sample(daemon: harness.Daemon, life: int, db: Path) -> Sample | None:
    try:
        rss = harness.tree_rss(daemon.pid)
        fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    except OSError:
        return None  # between a kill and the next start
    size, oldest = _state(db, time.time())
    return Sample(life, time.monotonic() - daemon.started, rss, fds, size, oldest)


def _drop(inbox: Path, index: int, seed: int) -> None:
    fmt = FORMATS[index % len(FORMATS)]
    path = inbox / f"scanner-{index % 4}" / f"soak-{index:07d}{SUFFIX[fmt]}"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(make_input(fmt, seed * 1_000_003 + index, size=20_000))


def _counts(db: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
    return int(rows.get("completed", 0)), int(rows.get("failed", 0))


def run(root: Path, minutes: float, rate: float, kill_every: float, seed: int = 1) -> Result:
    """Soak for ``minutes`` under ``root``; raise AssertionError when an input is lost."""
    folders = harness.Folders(root).make()
    started = time.monotonic()
    result = Result(0.0, 0, 0, 0, 0, 0)
    with harness.Emulator(root / "emulator", "0.2-1.0") as emulator:
        emulator.http.post("/_emulator/faults", json=FAULTS).raise_for_status()
        config = harness.write_config(
            folders,
            emulator.url,
            {"poll_interval": 1.0},
            quiet_period=0.5,
            on_success="delete",
            max_in_flight=16,
        )
        daemon = harness.Daemon(config, root)
        try:
            daemon.wait_ready()
            daemon = _work(
                daemon,
                config,
                folders,
                result,
                end=started + minutes * 60,
                rate=rate,
                kill_every=kill_every,
                rng=random.Random(seed),
                seed=seed,
            )
            emulator.http.post("/_emulator/faults", json=HEALTHY).raise_for_status()
            harness.wait_until(
                lambda: sum(_counts(folders.db)) >= result.files, timeout=300, step=0.5
            )
        finally:
            daemon.stop()
        result.completed, result.failed = _counts(folders.db)
        result.db_bytes = _state(folders.db, time.time())[0]
        result.remote_jobs = len(emulator.ledger()["jobs"])
    result.seconds = time.monotonic() - started
    assert result.failed == 0, f"{result.failed} inputs failed"
    assert result.completed == result.files, f"{result.completed} of {result.files} completed"
    assert result.remote_jobs <= result.files + result.kills, "more remote jobs than the bound"
    return result


def _work(
    daemon: harness.Daemon,
    config: Path,
    folders: harness.Folders,
    result: Result,
    *,
    end: float,
    rate: float,
    kill_every: float,
    rng: random.Random,
    seed: int,
) -> harness.Daemon:
    """Drop files, sample and kill until ``end``; return the daemon that runs then."""
    next_drop = next_sample = time.monotonic()
    next_kill = next_drop + rng.expovariate(1 / kill_every) if kill_every else float("inf")
    while (now := time.monotonic()) < end:
        if now >= next_drop:
            _drop(folders.inbox, result.files, seed)
            result.files += 1
            next_drop += 1 / rate
        if now >= next_sample:
            if (sample := _sample(daemon, result.kills, folders.db)) is not None:
                result.samples.append(sample)
            next_sample += SAMPLE_EVERY
        if now >= next_kill:
            daemon = _restart(daemon, config, folders.root)
            result.kills += 1
            # Every life is sampled at least once, however late in the soak it starts.
            if (sample := _sample(daemon, result.kills, folders.db)) is not None:
                result.samples.append(sample)
            next_kill = time.monotonic() + rng.expovariate(1 / kill_every)
        time.sleep(max(0.0, min(next_drop, next_sample, next_kill, end) - time.monotonic()))
    return daemon


def _restart(daemon: harness.Daemon, config: Path, root: Path) -> harness.Daemon:
    """SIGKILL the daemon and start a new one."""
    with contextlib.suppress(ProcessLookupError):
        daemon.proc.send_signal(signal.SIGKILL)
    harness.reap(daemon.proc, 10)
    daemon.stop()
    fresh = harness.Daemon(config, root)
    fresh.wait_ready()
    return fresh


def write_samples(samples: list[Sample], path: Path) -> None:
    """The samples as CSV, one row each, for a plot."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow([f.name for f in fields(Sample)])
        writer.writerows(astuple(sample) for sample in samples)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=2.0, help="files per second")
    parser.add_argument("--kill-every", type=float, default=300.0, help="mean seconds; 0 = never")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, help="folder for the run (default: a temporary one)")
    parser.add_argument("--samples", type=Path, help="also write every sample to this CSV file")
    harness.add_set_option(parser)
    args = parser.parse_args(argv)
    harness.SETTINGS.update(harness.parse_settings(args.set))
    with tempfile.TemporaryDirectory(prefix="ldx-soak-", dir=args.work) as work:
        result = run(Path(work), args.minutes, args.rate, args.kill_every, args.seed)
    print(result.table())
    if args.samples:
        write_samples(result.samples, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
