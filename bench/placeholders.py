"""Placeholders: what many empty files waiting in the inbox cost a running daemon.

``python -m bench.placeholders --files 100000`` drops that many empty files (a
scanner's placeholders, which wait for content for ever) into a fresh inbox, starts the
emulator and the daemon as subprocesses, waits for the start-up scan and for the
placeholders to show as stalled (every one noted in the state table: how long that
took is the one-time cost), then measures the steady state over a window: the daemon's
CPU share of one core, its current and peak RSS, and how many lines ``status`` prints.
It prints one table and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    PYTHON,
    Daemon,
    Emulator,
    Folders,
    MiB,
    clean_env,
    rss_bytes,
    wait_until,
    write_config,
)

STALLED_AFTER = 5.0  # seconds: placeholders show as stalled this soon in the run


@dataclass(frozen=True)
class Measured:
    """What one run measured."""

    files: int
    scan_seconds: float
    noted_seconds: float  # from ready until every placeholder showed as stalled
    cpu_share: float  # of one core, over the window
    rss: int
    peak_rss: int
    status_lines: int
    status_seconds: float


def make_placeholders(inbox: Path, count: int, per_folder: int = 5000) -> None:
    """``count`` empty files, ``per_folder`` to a folder (as scanners make them)."""
    for index in range(count):
        folder = inbox / f"scanner-{index // per_folder:03d}"
        if index % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"scan-{index:06d}.pdf").touch()


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(root: Path, files: int, window: float) -> Measured:
    """Drop ``files`` placeholders, run the daemon, measure it over ``window`` seconds."""
    folders = Folders(root).make()
    make_placeholders(folders.inbox, files)
    with Emulator(root / "hub") as hub:
        config = write_config(
            folders, hub.url, stalled_after=STALLED_AFTER, quiet_period=1.0, rescan_interval=60.0
        )
        with Daemon(config, root) as daemon:
            scan = daemon.wait_ready(timeout=600)
            ready = time.monotonic()
            wait_until(lambda: waiting(folders.db) >= files, 1800, step=0.5)
            noted = time.monotonic() - ready
            time.sleep(2.0)  # let the last notes' log lines and commits settle
            before, start = _cpu(daemon.pid), time.monotonic()
            time.sleep(window)
            share = (_cpu(daemon.pid) - before) / (time.monotonic() - start)
            rss, peak = rss_bytes(daemon.pid)
            began = time.monotonic()
            status = subprocess.run(
                [PYTHON, "-m", "daemon", "status", "-c", str(config)],
                capture_output=True,
                text=True,
                env=clean_env(),
                check=False,
            )
            status_seconds = time.monotonic() - began
    return Measured(
        files, scan, noted, share, rss, peak, len(status.stdout.splitlines()), status_seconds
    )


def waiting(db: Path) -> int:
    """How many inputs the state table shows as stalled."""
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return int(conn.execute("SELECT count(*) FROM waiting").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def main(argv: list[str] | None = None) -> int:
    """Run once and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ldx-placeholders-", dir=args.work))
    try:
        found = run(root, args.files, args.window)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        "| files | start-up to ready | all noted stalled | idle CPU (of a core) | RSS "
        "| peak RSS | status lines |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {found.files} | {found.scan_seconds:.1f} s | {found.noted_seconds:.1f} s | "
        f"{found.cpu_share:.1%} | "
        f"{found.rss / MiB:.0f} MiB | {found.peak_rss / MiB:.0f} MiB | "
        f"{found.status_lines} ({found.status_seconds:.1f} s) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
