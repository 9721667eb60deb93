"""The scenarios of issue 6, one function each; every call is one run and returns its numbers.

(a) throughput against a reference client, (b) requests per file, (c) latency, (d) idle
CPU, (e) memory with big files, (f) restart over a big table, (g) a burst of files.
Each run uses fresh processes and folders under ``Context.work``; inputs come from a
corpus shared by the runs of one bench invocation.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import inputs, state
from bench.harness import (
    PYTHON,
    Daemon,
    Emulator,
    Folders,
    MiB,
    clean_env,
    count_errors,
    count_outputs,
    last_published,
    mark,
    percentile,
    process_tree,
    requests_total,
    sched_totals,
    settle_disk,
    wait_outputs,
    wait_until,
    write_config,
)

SMOKE_SCALE = 0.05
FINISH_POLL = 0.25  # seconds between the harness's looks at the outbox in a timed run


@dataclass(frozen=True)
class Context:
    """Where a run works, where the shared corpus lives, and how much to shrink counts."""

    root: Path
    scale: float = 1.0
    name: str = "setup"

    @property
    def work(self) -> Path:
        return self.root / self.name

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    def for_run(self, name: str) -> Context:
        """The context of one run (a fresh work folder)."""
        return Context(self.root, self.scale, name)

    def count(self, full: int, least: int = 5) -> int:
        """``full`` scaled down, but at least ``least``."""
        return max(least, round(full * self.scale))

    @property
    def smoke(self) -> bool:
        """A smoke run (the test suite): tiny counts, short waits, meaningless numbers."""
        return self.scale < SMOKE_SCALE

    def pick(self, full: str, smoke: str) -> str:
        """A setting for a real run, or a faster one for a smoke run."""
        return smoke if self.smoke else full

    def seconds(self, full: float, smoke: float) -> float:
        """A duration for a real run, or a shorter one for a smoke run."""
        return smoke if self.smoke else full


def _daemon_folders(ctx: Context, names: list[str]) -> tuple[Folders, Path]:
    """Fresh daemon folders with the input folders made, and the staged inputs."""
    folders = Folders(ctx.work / "daemon").make()
    inputs.make_folders(folders.inbox, names)
    staging = ctx.work / "staging"
    inputs.stage(ctx.corpus, names, staging)
    return folders, staging


def _reference(
    emu: Emulator, ctx: Context, names: list[str], naive: bool, tag: str = "ref"
) -> dict[str, Any]:
    inbox, outbox = ctx.work / f"{tag}-in", ctx.work / f"{tag}-out"
    inputs.stage(ctx.corpus, names, inbox)
    settle_disk()
    args = [PYTHON, "-m", "bench.reference", "--url", emu.url, "--inbox", str(inbox)]
    args += ["--outbox", str(outbox), "--concurrency", "32", "--poll", "naive" if naive else "long"]
    done = subprocess.run(args, capture_output=True, text=True, env=clean_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the reference client failed: {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _drop_and_wait(
    daemon: Daemon, folders: Folders, staging: Path, names: list[str], timeout: float
) -> float:
    """Drop the staged inputs; return the seconds until the last output was published.

    The span runs from a marker file made just before the drop to the newest output's
    change time, so the harness looks at the outbox only every ``FINISH_POLL`` seconds:
    it neither takes CPU from the daemon's run nor adds its polling interval to it (the
    reference client times itself, with no one polling)."""
    settle_disk()
    started, looked_from = mark(folders.root / "dropped"), time.monotonic()
    inputs.drop(staging, names, folders.inbox)
    observed = wait_outputs(folders.outbox, len(names), timeout, step=FINISH_POLL) - looked_from
    seconds = last_published(folders.outbox) - started
    if not observed - FINISH_POLL - 0.1 < seconds < observed + 0.1:
        raise RuntimeError(f"file times say {seconds:.3f} s, the harness saw {observed:.3f} s")
    return seconds


def _wait_done(db: Path, expected: int, timeout: float) -> None:
    """Wait until ``expected`` jobs are final in the daemon's table (inputs handled)."""

    def done() -> bool:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            row = conn.execute("SELECT count(*) FROM jobs WHERE stage IN ('done', 'failed')")
            return int(row.fetchone()[0]) >= expected

    wait_until(done, timeout, step=0.1)


# -- (a) throughput ------------------------------------------------------------------------


def throughput(ctx: Context) -> dict[str, float]:
    """2,000 files of ~100 KB at processing time 0: daemon against the reference client."""
    names = inputs.make_corpus(ctx.corpus, ctx.count(2000))
    before = _throughput_reference(ctx, names, "before")
    with Emulator(ctx.work / "emu-daemon", "0") as emu:
        folders, staging = _daemon_folders(ctx, names)
        config = write_config(folders, emu.url, quiet_period=0.2, max_in_flight=32)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            cpu0, emu_cpu0 = daemon.cpu(), _cpu(emu)
            sched0 = _sched_by_process(daemon.pid)
            seconds = _drop_and_wait(daemon, folders, staging, names, timeout=900)
            cpu, emu_cpu = daemon.cpu() - cpu0, _cpu(emu) - emu_cpu0
            split = _sched_split(sched0, _sched_by_process(daemon.pid), seconds, len(names))
    after = _throughput_reference(ctx, names, "after")
    files = len(names)
    reference_s = bracketed(before["seconds"], after["seconds"])
    return split | {
        "reference_fps": files / reference_s,
        "reference_drift": after["seconds"] / before["seconds"],
        "reference_cpu_ms": bracketed(before["cpu"], after["cpu"]) / files * 1000,
        "daemon_fps": files / seconds,
        "ratio": seconds / reference_s,
        "daemon_cpu_ms": cpu / files * 1000,
        "emulator_cpu_ms": emu_cpu / files * 1000,
        "cores_busy": (cpu + emu_cpu) / seconds,
        "ratio_floor": ratio_floor(cpu + emu_cpu, reference_s, os.cpu_count() or 1),
    }


def _sched_by_process(daemon_pid: int) -> dict[str, tuple[int, float, float]]:
    """(pid, seconds on a CPU, seconds waiting for one) of the daemon and, when it runs
    one, its transfer process."""
    tree = process_tree(daemon_pid)
    found = {"daemon": (daemon_pid, *sched_totals(daemon_pid))}
    if len(tree) > 1:
        found["transfer"] = (tree[1], *sched_totals(tree[1]))
    return found


def _sched_split(
    before: dict[str, tuple[int, float, float]],
    after: dict[str, tuple[int, float, float]],
    seconds: float,
    files: int,
) -> dict[str, float]:
    """Each process's CPU per file, and its share of the timed section on a CPU and
    runnable but waiting for one: which process bounds the pipeline (NaN: no transfer
    process, or not the same one at both ends)."""
    split = {}
    for name in ("daemon", "transfer"):
        if name in before and name in after and before[name][0] == after[name][0]:
            ran, waited = (after[name][i] - before[name][i] for i in (1, 2))
        else:
            ran = waited = float("nan")
        split[f"{name}_own_cpu_ms"] = ran / files * 1000
        split[f"{name}_on_cpu"] = ran / seconds
        split[f"{name}_waiting"] = waited / seconds
    return split


def _throughput_reference(ctx: Context, names: list[str], when: str) -> dict[str, Any]:
    """One reference run of (a), on an emulator of its own."""
    with Emulator(ctx.work / f"emu-ref-{when}", "0") as emu:
        return _reference(emu, ctx, names, naive=False, tag=f"ref-{when}")


def bracketed(before: float, after: float) -> float:
    """The reference's wall time (or CPU time) to set against a daemon run made between
    two reference runs: their mean. The machine's speed drifts within minutes (the same
    reference run has taken a third longer a minute later); one run before the daemon's
    would put all of that drift into the ratio, the mean of one before and one after
    cancels a steady drift."""
    return (before + after) / 2


def ratio_floor(cpu_seconds: float, reference_seconds: float, cores: int) -> float:
    """The lowest daemon / reference ratio the measured CPU allows: the daemon and the
    emulator spending ``cpu_seconds`` together, spread perfectly over ``cores``, could not
    finish sooner than ``cpu_seconds / cores``; a daemon in one process under the GIL
    stays well above this."""
    return cpu_seconds / cores / reference_seconds


def _cpu(emu: Emulator) -> float:
    from bench.harness import cpu_seconds

    return cpu_seconds(emu.proc.pid)


# -- (b) API economy -----------------------------------------------------------------------


def economy(ctx: Context) -> dict[str, float]:
    """300 files at 3-8 s each, 32 in flight: requests per file, daemon and naive polling."""
    names = inputs.make_corpus(ctx.corpus, ctx.count(300))
    processing = ctx.pick("3-8", "0.2-0.5")
    with Emulator(ctx.work / "emu-daemon", processing) as emu:
        folders, staging = _daemon_folders(ctx, names)
        config = write_config(folders, emu.url, quiet_period=0.2, max_in_flight=32)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            _drop_and_wait(daemon, folders, staging, names, timeout=900)
            _wait_done(folders.db, len(names), timeout=60)
            ledger = emu.ledger()
    with Emulator(ctx.work / "emu-naive", processing) as emu:
        _reference(emu, ctx, names, naive=True)
        naive = requests_total(emu.ledger())
    routes = ", ".join(f"{k} {v}" for k, v in sorted(ledger["requests"].items()))
    print(f"      daemon requests: {routes}")
    return {
        "daemon_rpf": requests_total(ledger) / len(names),
        "min_poll_gap": _min_poll_gap(ledger["events"]),
        "naive_rpf": naive / len(names),
    }


def _min_poll_gap(events: list[dict[str, Any]]) -> float:
    """The shortest time between the starts of two polls of the same job."""
    starts: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event["route"] == "GET /renderocr/jobs/{job_id}":
            starts[event["path"]].append(event["at"])
    gaps = []
    for times in starts.values():
        ordered = sorted(times)
        gaps += [b - a for a, b in itertools.pairwise(ordered)]
    return min(gaps, default=float("inf"))


# -- (c) latency ---------------------------------------------------------------------------


def latency(ctx: Context) -> dict[str, float]:
    """Files written one by one; hub completion → published, quiet period end → upload."""
    quiet = 1.0
    names = inputs.make_corpus(ctx.corpus, ctx.count(60))
    with Emulator(ctx.work / "emu", ctx.pick("1-3", "0.2-0.5")) as emu:
        folders, staging = _daemon_folders(ctx, names)
        config = write_config(folders, emu.url, quiet_period=quiet, max_in_flight=32)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            written = _trickle(staging, names, folders.inbox, interval=0.2)
            wait_outputs(folders.outbox, len(names), timeout=300)
            _wait_done(folders.db, len(names), timeout=60)
            ledger = emu.ledger()
    rows = _job_rows(folders.db)
    uploads = _upload_delays(ledger["events"], rows, written, quiet)
    publishes = _publish_delays(ledger["jobs"], rows, folders.outbox)
    return {
        "publish_p50": percentile(publishes, 0.5),
        "publish_p95": percentile(publishes, 0.95),
        "upload_p50": percentile(uploads, 0.5),
        "upload_max": max(uploads),
    }


def _trickle(staging: Path, names: list[str], inbox: Path, interval: float) -> dict[str, float]:
    """Write each input into the inbox in turn; return when each write ended (monotonic)."""
    written = {}
    for rel in names:
        data = (staging / rel).read_bytes()
        with (inbox / rel).open("wb") as out:
            out.write(data)
        written[rel] = time.monotonic()
        time.sleep(interval)
    return written


def _job_rows(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM jobs")]


def _upload_delays(
    events: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    written: dict[str, float],
    quiet: float,
) -> list[float]:
    path_of = {str(row["id"]): row["path"] for row in rows}
    first: dict[str, float] = {}
    for event in events:
        if event["route"] == "POST /files" and event["trace"] in path_of:
            first.setdefault(path_of[event["trace"]], event["at"])
    return [first[path] - (written[path] + quiet) for path in written if path in first]


def _publish_delays(
    jobs: list[dict[str, Any]], rows: list[dict[str, Any]], outbox: Path
) -> list[float]:
    ends = {job["job_id"]: job["finishes_at"] for job in jobs}
    delays = []
    for row in rows:
        if row["remote_job_id"] in ends and row["output"]:
            published = (outbox / row["output"]).stat().st_ctime
            delays.append(published - ends[row["remote_job_id"]])
    return delays


# -- (d) idle cost ---------------------------------------------------------------------------


def idle(ctx: Context) -> dict[str, float]:
    """20,000 completed rows and kept files, nothing new: CPU over 60 s, inotify and polling."""
    count = ctx.count(20_000, least=50)
    seconds = ctx.seconds(60.0, 1.0)
    folders = state.populate(Folders(ctx.work / "daemon").make(), count)
    result = {}
    for mode, polling in (("inotify", False), ("polling", True)):
        with Emulator(ctx.work / f"emu-{mode}", "0") as emu:
            config = write_config(folders, emu.url, use_polling=polling, polling_interval=2.0)
            with Daemon(config, folders.root) as daemon:
                daemon.wait_ready()
                time.sleep(ctx.seconds(3.0, 0.5))  # let the start-up work settle
                cpu0, wall0 = daemon.cpu(), time.monotonic()
                time.sleep(seconds)
                cpu, wall = daemon.cpu() - cpu0, time.monotonic() - wall0
            uploads = len(emu.ledger()["uploads"])
        if uploads:
            raise AssertionError(f"idle daemon uploaded {uploads} files")
        result[f"{mode}_cpu_pct"] = cpu / wall * 100
    return result


# -- (e) memory ------------------------------------------------------------------------------


def memory(ctx: Context) -> dict[str, float]:
    """One input and one output of 20 MB, then of 190 MB: peak RSS of each daemon."""
    small = ctx.count(20_000_000, least=1_000_000)
    big = ctx.count(190_000_000, least=int(small * 9.5))
    rss = {size: _peak_rss_for(ctx, size) for size in (small, big)}
    return {
        "rss_small_mb": rss[small] / MiB,
        "rss_big_mb": rss[big] / MiB,
        "rss_ratio": rss[big] / rss[small],
    }


def _peak_rss_for(ctx: Context, size: int) -> int:
    root = ctx.work / f"size-{size}"
    with Emulator(root / "emu", "0.5", "--output-size", str(size)) as emu:
        folders = Folders(root / "daemon").make()
        staged = root / "big.pdf"
        inputs.write_big_pdf(staged, size)
        config = write_config(folders, emu.url, quiet_period=0.5)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            os.rename(staged, folders.inbox / "big.pdf")
            wait_outputs(folders.outbox, 1, timeout=600, step=0.1)
            _wait_done(folders.db, 1, timeout=60)
            peak = daemon.stop()
        output = folders.outbox / "big.docx"
        if output.stat().st_size < size:
            raise AssertionError(f"the output has {output.stat().st_size} bytes, not {size}")
    shutil.rmtree(root)
    return peak


# -- (f) restart -----------------------------------------------------------------------------


def restart(ctx: Context) -> dict[str, float]:
    """50,000 completed rows and files: spawn → READY=1, and no upload at all."""
    count = ctx.count(50_000, least=50)
    folders = state.populate(Folders(ctx.work / "daemon").make(), count)
    with Emulator(ctx.work / "emu", "0") as emu:
        config = write_config(folders, emu.url)
        with Daemon(config, folders.root) as daemon:
            ready = daemon.wait_ready()
            time.sleep(ctx.seconds(2.0, 0.5))  # an upload would have started by now
            uploads = len(emu.ledger()["uploads"])
    return {"ready_s": ready, "uploads": float(uploads)}


# -- (g) burst -------------------------------------------------------------------------------


def burst(ctx: Context) -> dict[str, float]:
    """5,000 files of ~100 KB at once: all completed, no error, peak RSS."""
    names = inputs.make_corpus(ctx.corpus, ctx.count(5000))
    with Emulator(ctx.work / "emu", "0-1") as emu:
        folders, staging = _daemon_folders(ctx, names)
        config = write_config(folders, emu.url, quiet_period=0.5, max_in_flight=32)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            seconds = _drop_and_wait(daemon, folders, staging, names, timeout=1800)
            _wait_done(folders.db, len(names), timeout=120)
            peak = daemon.stop()
    rows = _job_rows(folders.db)
    failed = sum(row["status"] == "failed" for row in rows)
    return {
        "completed": float(count_outputs(folders.outbox)),
        "errors": float(failed + count_errors(folders.outbox)),
        "rss_mb": peak / MiB,
        "fps": len(names) / seconds,
    }
