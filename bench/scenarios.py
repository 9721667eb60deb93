"""The scenarios of issue 6, one function each; every call is one run and returns its numbers.

(a) throughput and CPU per file against a reference client, (c) latency, (d) idle CPU,
(e) memory with big files, (f) restart over a big table, (g) a burst of files; the hub
economy scenarios of issue 38 ((b), (h), (i)) are in ``bench.economy``. Each run uses
fresh processes and folders under ``Context.work``; inputs come from a corpus shared by
the runs of one bench invocation.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
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
    cpu_seconds,
    last_published,
    mark,
    percentile,
    process_tree,
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

    def jobs(self, low: float, high: float) -> str:
        """The emulator's processing time for jobs of ``low``-``high`` s, shortened with
        the scale (``processing_range``)."""
        return processing_range(low, high, self.scale)


def processing_range(low: float, high: float, scale: float, least: float = 0.05) -> str:
    """``--processing-time`` for jobs of ``low``-``high`` s scaled by ``scale`` (never
    longer than the real ones, never shorter than ``least``), e.g. ``"30-90"``."""
    factor = min(1.0, scale)
    return f"{max(least, low * factor):g}-{max(least, high * factor):g}"


def daemon_folders(ctx: Context, names: list[str]) -> tuple[Folders, Path]:
    """Fresh daemon folders with the input folders made, and the staged inputs."""
    folders = Folders(ctx.work / "daemon").make()
    inputs.make_folders(folders.inbox, names)
    staging = ctx.work / "staging"
    inputs.stage(ctx.corpus, names, staging)
    return folders, staging


def reference(
    emu: Emulator, ctx: Context, names: list[str], naive: bool, tag: str = "ref"
) -> dict[str, Any]:
    """One run of the reference client (``bench.reference``) over ``names``; its JSON line."""
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


def drop_and_wait(
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


def wait_done(db: Path, expected: int, timeout: float) -> None:
    """Wait until ``expected`` jobs are final in the daemon's table (inputs handled)."""

    def done() -> bool:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            row = conn.execute("SELECT count(*) FROM jobs WHERE stage IN ('done', 'failed')")
            return int(row.fetchone()[0]) >= expected

    wait_until(done, timeout, step=0.1)


# -- (a) throughput ------------------------------------------------------------------------


def throughput(ctx: Context) -> dict[str, float]:
    """2,000 files of ~100 KB at processing time 0: files/s, and the daemon's CPU per file
    against the reference client's (a run just before the daemon's and one just after)."""
    names = inputs.make_corpus(ctx.corpus, ctx.count(2000))
    before = _throughput_reference(ctx, names, "before")
    with Emulator(ctx.work / "emu-daemon", "0") as emu:
        folders, staging = daemon_folders(ctx, names)
        config = write_config(folders, emu.url, quiet_period=0.2, max_in_flight=32)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            cpu0, emu_cpu0 = daemon.cpu(), _cpu(emu)
            seconds = drop_and_wait(daemon, folders, staging, names, timeout=900)
            cpu, emu_cpu = daemon.cpu() - cpu0, _cpu(emu) - emu_cpu0
            processes = len(process_tree(daemon.pid))
            peak = daemon.stop()
    after = _throughput_reference(ctx, names, "after")
    files = len(names)
    reference_cpu = bracketed(before["cpu"], after["cpu"])
    return {
        "daemon_fps": files / seconds,
        "reference_fps": files / bracketed(before["seconds"], after["seconds"]),
        "daemon_cpu_ms": cpu / files * 1000,
        "reference_cpu_ms": reference_cpu / files * 1000,
        "cpu_ratio": cpu / reference_cpu,
        "reference_drift": after["cpu"] / before["cpu"],
        "emulator_cpu_ms": emu_cpu / files * 1000,
        "processes": float(processes),
        "rss_mb": peak / MiB,
    }


def _throughput_reference(ctx: Context, names: list[str], when: str) -> dict[str, Any]:
    """One reference run of (a), on an emulator of its own."""
    with Emulator(ctx.work / f"emu-ref-{when}", "0") as emu:
        return reference(emu, ctx, names, naive=False, tag=f"ref-{when}")


def bracketed(before: float, after: float) -> float:
    """The reference's CPU (or wall) time to set against a daemon run made between two
    reference runs: their mean. The machine's speed drifts within minutes (the same
    reference run has needed a third more a minute later); one run before the daemon's
    would put all of that drift into the ratio, the mean of one before and one after
    cancels a steady drift."""
    return (before + after) / 2


def _cpu(emu: Emulator) -> float:
    return cpu_seconds(emu.proc.pid)


# -- (c) latency ---------------------------------------------------------------------------


def latency(ctx: Context) -> dict[str, float]:
    """Files written one by one; hub completion → published, quiet period end → upload."""
    quiet = 1.0
    names = inputs.make_corpus(ctx.corpus, ctx.count(60))
    with Emulator(ctx.work / "emu", ctx.pick("1-3", "0.2-0.5")) as emu:
        folders, staging = daemon_folders(ctx, names)
        config = write_config(folders, emu.url, quiet_period=quiet, max_in_flight=32)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            written = _trickle(staging, names, folders.inbox, interval=0.2)
            wait_outputs(folders.outbox, len(names), timeout=300)
            wait_done(folders.db, len(names), timeout=60)
            ledger = emu.ledger()
    rows = job_rows(folders.db)
    uploads = _upload_delays(ledger["events"], rows, written, quiet)
    publishes = publish_delays(ledger["jobs"], rows, folders.outbox)
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


def job_rows(db: Path) -> list[dict[str, Any]]:
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


def publish_delays(
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
    seconds = ctx.seconds(60.0, 0.5)
    folders = state.populate(Folders(ctx.work / "daemon").make(), count)
    result = {}
    for mode, polling in (("inotify", False), ("polling", True)):
        with Emulator(ctx.work / f"emu-{mode}", "0") as emu:
            config = write_config(folders, emu.url, use_polling=polling, polling_interval=2.0)
            with Daemon(config, folders.root) as daemon:
                daemon.wait_ready()
                time.sleep(ctx.seconds(3.0, 0.2))  # let the start-up work settle
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
    with Emulator(root / "emu", ctx.pick("0.5", "0.05"), "--output-size", str(size)) as emu:
        folders = Folders(root / "daemon").make()
        staged = root / "big.pdf"
        inputs.write_big_pdf(staged, size)
        config = write_config(folders, emu.url, quiet_period=0.5)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            os.rename(staged, folders.inbox / "big.pdf")
            wait_outputs(folders.outbox, 1, timeout=600, step=0.1)
            wait_done(folders.db, 1, timeout=60)
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
        folders, staging = daemon_folders(ctx, names)
        config = write_config(folders, emu.url, quiet_period=0.5, max_in_flight=32)
        with Daemon(config, folders.root) as daemon:
            daemon.wait_ready()
            seconds = drop_and_wait(daemon, folders, staging, names, timeout=1800)
            wait_done(folders.db, len(names), timeout=120)
            peak = daemon.stop()
    rows = job_rows(folders.db)
    failed = sum(row["status"] == "failed" for row in rows)
    return {
        "completed": float(count_outputs(folders.outbox)),
        "errors": float(failed + count_errors(folders.outbox)),
        "rss_mb": peak / MiB,
        "fps": len(names) / seconds,
    }
