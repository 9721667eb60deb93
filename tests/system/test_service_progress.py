"""``once`` shows a progress bar with counts per status on a terminal, and nothing in a pipe."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from daemon.emulator.server import EmulatorServer
from daemon.ops.progress import counts_text, done_and_total
from tests.conftest import daemon_config
from tests.helpers import _env, cli
from tests.scans import make_scan

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal as stdin, stdout and stderr; return code and text."""
    leader, follower = pty.openpty()
    env = {**_env(), "TERM": "xterm-256color", "COLUMNS": "160"}
    proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    code = proc.wait(timeout=60)
    return code, ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


def test_counts_text_and_totals() -> None:
    """The bar's label lists every status; done counts completed and failed."""
    counts = {"queued": 1, "processing": 2, "completed": 3, "failed": 4}
    assert counts_text(counts) == "1 queued · 2 processing · 3 completed · 4 failed"
    assert done_and_total(counts) == (7, 10)


def test_once_shows_progress_only_on_a_terminal(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """On a terminal: a bar with per-status counts; in a pipe: no bar, no carriage returns."""
    for i in range(3):
        (folders["inbox"] / f"scan {i}.png").write_bytes(make_scan("png", seed=i))
    config = daemon_config(tmp_path, folders, emulator.url, log_level="warning")
    code, shown = run_on_a_terminal([sys.executable, "-m", "daemon", "once", "-c", str(config)])
    assert code == 0, shown
    assert "converting" in shown
    assert "3/3" in shown
    assert "0 queued · 0 processing · 3 completed · 0 failed" in shown
    assert "3 completed, 0 failed, 0 unfinished" in shown
    (folders["inbox"] / "more.png").write_bytes(make_scan("png", seed=9))
    piped = cli(config, "once")
    assert piped.returncode == 0, piped.stdout + piped.stderr
    assert "4 completed, 0 failed" in piped.stdout
    text = piped.stdout + piped.stderr
    assert "converting" not in text
    assert "\r" not in text
    assert "·" not in text
