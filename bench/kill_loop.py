"""Kill loop: SIGKILL the daemon at random moments, restart it, and check nothing was lost.

Usage: python -m bench.kill_loop [--files 100] [--kills 200] [--seed 1]

The daemon runs as a real subprocess against the emulator on loopback. After the kills a
final ``once`` run brings everything to an end, then the checks of tests/faults.py run:
every input has exactly one output, byte-identical to what the emulator produced, no
temporary file is left under the outbox, SQLite's integrity check passes, and the hub saw
at most one extra remote job per kill. The test suite runs a short loop; run a long one
by hand and quote its numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.emulator.hub import DEFAULT_API_KEY
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from tests.faults import assert_exactly_once, job_rows
from tests.scans import drop_scans


@dataclass
class Result:
    """What one kill loop did and saw."""

    files: int
    kills: int
    kills_mid_work: int
    uploads: int
    remote_jobs: int
    seconds: float

    def line(self) -> str:
        """One summary line."""
        return (
            f"kill loop: {self.files} files, {self.kills} SIGKILLs "
            f"({self.kills_mid_work} with work in flight), {self.uploads} uploads, "
            f"{self.remote_jobs} remote jobs (bound {self.files + self.kills}), "
            f"{self.seconds:.1f} s: every input exactly one output, byte-identical; "
            f"no temporary file; integrity ok"
        )


def _config(root: Path, url: str) -> Path:
    (root / "api-key").write_text(DEFAULT_API_KEY + "\n", encoding="utf-8")
    path = root / "config.toml"
    path.write_text(
        f'inbox = "{root / "inbox"}"\noutbox = "{root / "outbox"}"\n'
        f'state_db = "{root / "state" / "state.db"}"\nquiet_period = 0.2\n'
        f'max_in_flight = 8\nlog_format = "json"\n'
        f'[hub]\nbase_url = "{url}"\napi_key_file = "{root / "api-key"}"\n'
        f"poll_interval = 1.0\nmax_requests_per_minute = 0\n",
        encoding="utf-8",
    )
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LDX_HOTFOLDER_")}


def _unfinished(db: Path) -> int:
    if not db.exists():
        return -1
    return sum(row["stage"] not in ("done", "failed") for row in job_rows(db))


def _wait_started(log_path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the daemon finished its start-up scan (Python's imports take a while)."""
    deadline = time.monotonic() + 30
    while b"start-up scan done" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the daemon did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.02)


def run(root: Path, files: int, kills: int, seed: int = 1) -> Result:
    """Run the loop under ``root``; raise AssertionError when a guarantee breaks."""
    rng = random.Random(seed)
    for name in ("inbox", "outbox", "state"):
        (root / name).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    settings = EmulatorSettings(processing_time=(1.0, 3.0), seed=seed)
    with EmulatorServer(settings) as server:
        inputs = drop_scans(root / "inbox", files, seed, folders=4)
        config = _config(root, server.url)
        db = root / "state" / "state.db"
        mid_work = 0
        for run_number in range(kills):
            log_path = root / f"daemon-{run_number}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "daemon", "run", "-c", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_env(),
                )
            _wait_started(log_path, proc)
            time.sleep(rng.uniform(0.0, 1.2))  # the random moment of the crash
            mid_work += _unfinished(db) > 0
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        final = subprocess.run(
            [sys.executable, "-m", "daemon", "once", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
            check=False,
        )
        assert final.returncode == 0, final.stderr[-3000:]
        assert_exactly_once(inputs, root / "outbox", db, server.hub)
        ledger = server.hub.ledger()
        remote_jobs = len(ledger["jobs"])
        assert remote_jobs <= files + kills, f"{remote_jobs} remote jobs > files + kills"
        return Result(
            files,
            kills,
            mid_work,
            len(ledger["uploads"]),
            remote_jobs,
            time.monotonic() - started,
        )


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ldx-kill-loop-") as tmp:
        result = run(Path(tmp), args.files, args.kills, args.seed)
    print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
