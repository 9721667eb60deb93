"""Test helpers: waiting on conditions with a deadline, and running the daemon for real."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from daemon.config import Settings
from daemon.jobs.model import Job, NewJob, Stage
from daemon.jobs.store import Store
from daemon.service import Service, prepare

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    what: str = "a condition",
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` every ``interval`` seconds until it returns something truthy;
    fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def cli(config: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m daemon ARGS -c CONFIG`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


def jobs_json(config: Path) -> list[dict[str, Any]]:
    """``jobs --json`` parsed."""
    result = cli(config, "jobs", "--json")
    assert result.returncode == 0, result.stderr
    parsed: list[dict[str, Any]] = json.loads(result.stdout)
    return parsed


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDX_HOTFOLDER_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Daemon:
    """``ldx-hotfolder run`` as a real subprocess, with its log in a file."""

    def __init__(
        self, config: Path, log_path: Path, preexec_fn: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.preexec_fn = preexec_fn  # run in the child before exec (dropping capabilities)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        """Start the daemon."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            preexec_fn=self.preexec_fn,  # noqa: PLW1509 (tests pass only a prctl call)
        )
        log.close()
        return self

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


async def wait_async(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "a condition"
) -> None:
    """Await ``predicate()`` becoming truthy, checking every 50 ms; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def daemon_in_process(settings: Settings) -> AsyncIterator[Service]:
    """``run`` in this event loop, ready (start-up scan done) when the block begins."""
    service = Service(settings, prepare(settings), once=False)
    runner = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 30)
        yield service
    finally:
        service.request_stop()
        await runner


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(") ", 1)[1][0] != "Z"


def input_name(uploaded: str) -> str:
    """The input's own file name behind the name it was uploaded under (daemon.outbox.layout)."""
    return re.sub(r"\.ldx-[0-9a-f]{16}(?=\.[^.]*$|$)", "", uploaded)


def enqueue(store: Store, new: NewJob, output: str, now: float) -> Job | None:
    """Insert one queued job (what intake does for a stable input)."""
    return store.add_jobs([(new, output, None)], now).get(new.path)


def plant_a_forgotten_upload(inbox: Path, state_db: Path, scan: bytes) -> None:
    """``late.png`` in the inbox with its job about to be created on a file id the hub
    never knew: as after a long stop between the upload and the job's creation."""
    path = inbox / "late.png"
    path.write_bytes(scan)
    st = path.stat()
    store = Store(f"sqlite:///{state_db}", upgrade=True)
    try:
        new = NewJob(
            "late.png", st.st_size, st.st_mtime_ns, st.st_ino, "png", "ki/ocr", "jpn", "docx"
        )
        job = enqueue(store, new, "late.docx", time.time())
        assert job is not None
        store.advance(job.id, Stage.SUBMITTING, time.time(), remote_file_id="0" * 32)
    finally:
        store.close()


def reject(
    store: Store, new: NewJob, output: str, code: str, message: str, now: float
) -> Job | None:
    """Insert one job refused before anything was sent."""
    return store.add_jobs([(new, output, (code, message))], now).get(new.path)
