"""Bench harness: the emulator and the daemon as separate processes, inputs, and timing.

Every benchmark in ``bench/`` runs the LDX hub emulator (``ldx-hotfolder emulator``) and
the daemon (``ldx-hotfolder run``) as subprocesses on loopback, exactly as an operator
would, so that what is measured includes process start, imports, real sockets and real
fsyncs. This module starts and stops them, writes the daemon's configuration, makes
inputs, and reads what the processes report: the emulator's ledger, the daemon's
``READY=1`` (over a ``NOTIFY_SOCKET`` of our own), and its CPU time, peak RSS and bytes
written from ``/proc`` (the daemon is one process; hooks it runs are counted with it).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from daemon.emulator.hub import DEFAULT_API_KEY

PYTHON = sys.executable
PY_SPY = Path(sys.executable).with_name("py-spy")
# When set (``perf --profile DIR``), every daemon and emulator runs under py-spy record.
PROFILE_DIR: Path | None = None
# Settings every daemon of this run gets, over the scenario's own (``bench.perf --set``).
SETTINGS: dict[str, Any] = {}
_profiles = itertools.count(1)  # numbers the profile files in start order
CLK_TCK = os.sysconf("SC_CLK_TCK")
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# Where emulators keep what they receive when it has room (below): RAM, not the disk
# the daemon writes to.
HUB_TMPFS = Path("/dev/shm")
HUB_TMPFS_MIN_FREE = 2 * GiB


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE``, repeatable: a top-level setting for every daemon of the run."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=TOML",
        help="a top-level daemon setting for every run, e.g. max_in_flight=64",
    )


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs with TOML values, as ``--set`` takes them."""
    try:
        return tomllib.loads("\n".join(pairs))
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"--set takes KEY=VALUE with a TOML value ({exc})") from exc


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child: no stray LDX_HOTFOLDER_* or systemd variables."""
    dropped = ("LDX_HOTFOLDER_", "NOTIFY_SOCKET", "WATCHDOG_", "CREDENTIALS_DIRECTORY")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(extra)
    return env


def settle_disk() -> None:
    """Write out every dirty page before a timed section: the inputs just staged for it
    would otherwise be written during the section, by the first fsync of whoever
    fsyncs (the daemon; the reference client never does)."""
    os.sync()


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.01) -> float:
    """Poll ``condition`` until true; return the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic()


# -- processes ----------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its running descendants (hooks the daemon runs, if any)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
    return found


def _own_cpu(pid: int) -> float:
    # utime + stime, plus cutime + cstime: children that ended and were waited for.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads) and of its
    children, running or ended."""
    total = _own_cpu(pid)
    for child in process_tree(pid)[1:]:
        with contextlib.suppress(OSError):
            total += _own_cpu(child)
    return total


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a running process, from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * KiB
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def written_bytes(pid: int) -> int:
    """Bytes a running process has caused to be written to storage so far
    (``write_bytes`` of /proc/PID/io, counted when it dirties a page of a file)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "write_bytes":
            return int(value)
    raise RuntimeError(f"/proc/{pid}/io has no write_bytes")


def profile(pid: int, name: str) -> subprocess.Popen[bytes] | None:
    """Start ``py-spy record`` (collapsed stacks) on ``pid`` when profiling is on."""
    if PROFILE_DIR is None:
        return None
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    out = PROFILE_DIR / f"{next(_profiles):02d}-{name}.txt"
    args = [str(PY_SPY), "record", "--pid", str(pid), "--output", str(out), "--rate", "200"]
    return subprocess.Popen(
        [*args, "--format", "raw", "--gil", "--nonblocking", "--subprocesses"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def tree_rss(pid: int) -> int:
    """Current RSS of ``pid`` and its children, summed."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += rss_bytes(member)[0]
    return total


def tree_peak_rss(pid: int, peaks: dict[int, int]) -> int:
    """Update ``peaks`` (peak RSS per process) from ``pid``'s tree; return their sum:
    the memory the daemon and its children may take at once."""
    for member in process_tree(pid):
        with contextlib.suppress(OSError):  # gone, or a zombie with no memory left
            peaks[member] = max(peaks.get(member, 0), rss_bytes(member)[1])
    return sum(peaks.values())


def reap(proc: subprocess.Popen[bytes], timeout: float, peaks: dict[int, int] | None = None) -> int:
    """Wait for ``proc`` with ``wait4``; return the peak RSS in bytes (VmHWM) of it
    and its children, summed (``peaks``: what was seen of them before).

    The peak is read from /proc while the process lives, not from ``ru_maxrss``: on
    Linux a child's ``ru_maxrss`` starts from its parent's RSS at the fork before exec,
    so it reported the bench's own size (168 MB) whenever that was larger.
    """
    deadline = time.monotonic() + timeout
    peaks = {} if peaks is None else peaks
    peak = 0
    while True:
        peak = max(peak, tree_peak_rss(proc.pid, peaks))
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return peak
        if time.monotonic() > deadline:
            proc.kill()
            deadline = time.monotonic() + 10
        time.sleep(0.02)


def stop_and_reap(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """Send ``sig``, wait; return the peak RSS in bytes (read first: a fast exit would
    leave nothing to read)."""
    peaks: dict[int, int] = {}
    tree_peak_rss(proc.pid, peaks)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    return reap(proc, timeout, peaks)


def _finish_profile(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        try:
            profiler.wait(timeout=60)  # it writes its flame graph when the process ends
        except subprocess.TimeoutExpired:
            profiler.kill()
            profiler.wait()


def hub_data_dir(fallback: Path, tmpfs: Path = HUB_TMPFS) -> Path:
    """A new folder for an emulator's files: on ``tmpfs`` when it has 2 GiB free, else
    ``fallback``.

    The real hub stores uploads and outputs on its own machines. An emulator writing them
    to the daemon's disk makes every fsync of the daemon (each output, each state commit)
    also write out the emulator's pages (ext4 commits its journal for the whole disk),
    a cost no installation pays; measured, it cost the daemon a fifth of its throughput
    in (a). The reference client never fsyncs, so it did not pay it at all.
    """
    with contextlib.suppress(OSError):
        if tmpfs.is_dir() and shutil.disk_usage(tmpfs).free >= HUB_TMPFS_MIN_FREE:
            return Path(tempfile.mkdtemp(prefix="ldx-hub-", dir=tmpfs))
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


class Emulator:
    """``ldx-hotfolder emulator`` in a subprocess on a port the kernel picks."""

    def __init__(self, root: Path, processing_time: str = "0", *extra: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "emulator.log"
        args = [PYTHON, "-m", "daemon", "emulator", "--port", "0", "--seed", "1"]
        self.data_dir = hub_data_dir(root / "data")
        args += ["--processing-time", processing_time, "--data-dir", str(self.data_dir)]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*args, *extra], stdout=subprocess.PIPE, stderr=self._log, env=clean_env()
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()  # "LDX hub emulator on URL (API key: ...)"
        if " on " not in line:
            self.stop()
            raise RuntimeError(f"the emulator did not start: {self.log_path.read_text()[-2000:]}")
        self.url = line.split(" on ", 1)[1].split()[0]
        self._profiler = profile(self.proc.pid, "emulator")
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def ledger(self) -> dict[str, Any]:
        """The emulator's ledger (what it received)."""
        body: dict[str, Any] = self.http.get("/_emulator/ledger").json()
        return body

    def stop(self) -> None:
        """Stop the emulator (SIGINT, as Ctrl-C) and wait for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(AttributeError):
            self.http.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        _finish_profile(getattr(self, "_profiler", None))
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def requests_total(ledger: dict[str, Any]) -> int:
    """Every API request the emulator counted (admin routes are not counted)."""
    return sum(int(n) for n in ledger["requests"].values())


@dataclass(frozen=True)
class Folders:
    """The daemon's folders under one bench root."""

    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def db(self) -> Path:
        return self.state / "state.db"

    def make(self) -> Folders:
        for folder in (self.inbox, self.outbox, self.state):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def write_config(folders: Folders, url: str, hub: dict[str, Any] | None = None, **top: Any) -> Path:
    """The daemon's config.toml for a bench run; ``top``/``hub`` override the defaults,
    and a ``None`` value leaves that setting out (the daemon's own default)."""
    key_file = folders.root / "api-key"
    key_file.write_text(DEFAULT_API_KEY + "\n", encoding="utf-8")
    settings: dict[str, Any] = {
        "inbox": str(folders.inbox),
        "outbox": str(folders.outbox),
        "state_db": str(folders.db),
        "log_format": "json",
        **top,
        **SETTINGS,
    }
    # The emulated hub has no request limit unless a scenario sets one on both sides.
    hub_settings = {
        "base_url": url,
        "api_key_file": str(key_file),
        "max_requests_per_minute": 0,
        **(hub or {}),
    }
    lines = [f"{k} = {_toml(v)}" for k, v in settings.items() if v is not None]
    lines += ["", "[hub]"]
    lines += [f"{k} = {_toml(v)}" for k, v in hub_settings.items() if v is not None]
    path = folders.root / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Daemon:
    """``ldx-hotfolder run`` in a subprocess, with a NOTIFY_SOCKET we listen on."""

    def __init__(self, config: Path, root: Path, *, command: str = "run") -> None:
        self.log_path = root / "daemon.log"
        # A socket path must fit in 108 bytes: a short temporary folder, not the run's.
        self._notify_dir = Path(tempfile.mkdtemp(prefix="ldx-notify-"))
        self._notify_path = self._notify_dir / "notify.sock"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self._notify_path))
        self._notify.setblocking(False)
        self.started = time.monotonic()
        self.ready_at: float | None = None
        self.peak_rss = 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "daemon", command, "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(NOTIFY_SOCKET=str(self._notify_path)),
            )
        self._profiler = profile(self.proc.pid, "daemon")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _drain_notify(self) -> None:
        while True:
            try:
                data = self._notify.recv(4096)
            except BlockingIOError:
                return
            if b"READY=1" in data.split(b"\n") and self.ready_at is None:
                self.ready_at = time.monotonic()

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Wait for READY=1; return the seconds from spawn to ready."""

        def ready() -> bool:
            self._drain_notify()
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self.log_path.read_text()[-3000:]}")
            return self.ready_at is not None

        wait_until(ready, timeout, step=0.005)
        assert self.ready_at is not None
        return self.ready_at - self.started

    def cpu(self) -> float:
        """CPU seconds used so far."""
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait; return the peak RSS (bytes) over the daemon's whole life."""
        if self.proc.returncode is None:
            self.peak_rss = stop_and_reap(self.proc, signal.SIGTERM, timeout)
        self._notify.close()
        shutil.rmtree(self._notify_dir, ignore_errors=True)
        _finish_profile(self._profiler)
        return self.peak_rss

    def log_events(self, event: str) -> int:
        """How many log lines name ``event``."""
        needle = f'"event": "{event}"'.encode()
        alt = f'"event":"{event}"'.encode()
        data = self.log_path.read_bytes()
        return data.count(needle) + data.count(alt)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- outputs --------------------------------------------------------------------------------


def is_output(name: str, suffix: str = ".docx") -> bool:
    """Whether a file name is a published output (temporary names start with a dot)."""
    return name.endswith(suffix) and not name.startswith(".")


def count_outputs(outbox: Path, suffix: str = ".docx") -> int:
    """How many outputs under ``outbox`` are published (cheap: a polling loop calls it)."""
    total = 0
    for _, _, files in os.walk(outbox):
        total += sum(1 for name in files if is_output(name, suffix))
    return total


def count_errors(outbox: Path) -> int:
    """Error files under ``outbox``."""
    return sum(
        1 for _, _, files in os.walk(outbox) for name in files if name.endswith(".error.txt")
    )


def wait_outputs(outbox: Path, expected: int, timeout: float, step: float = 0.05) -> float:
    """Wait until ``expected`` outputs are published; return that monotonic moment."""
    return wait_until(lambda: count_outputs(outbox) >= expected, timeout, step)


def change_time(path: Path | str) -> float:
    """A file's change time (ctime), in seconds since the epoch."""
    return os.stat(path).st_ctime_ns / 1e9


def mark(path: Path) -> float:
    """Create ``path`` and return its change time: the start of a span that
    ``last_published`` ends, both read from the kernel's clock for file times."""
    path.touch(exist_ok=False)
    return change_time(path)


def last_published(outbox: Path, suffix: str = ".docx") -> float:
    """The change time of the newest published output under ``outbox``: the rename that
    published it sets it, so a span measured with it ends when the output appeared,
    however seldom the harness looked."""
    return max(
        change_time(os.path.join(folder, name))
        for folder, _, files in os.walk(outbox)
        for name in files
        if is_output(name, suffix)
    )


# -- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


@contextlib.contextmanager
def cpu_window(pid: int) -> Iterator[dict[str, float]]:
    """Measure a process's CPU seconds and the wall seconds of a ``with`` block."""
    result: dict[str, float] = {}
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    yield result
    result["cpu"] = cpu_seconds(pid) - cpu0
    result["wall"] = time.monotonic() - wall0


def rng_bytes(rng: random.Random, size: int) -> bytes:
    """``size`` pseudo-random bytes (incompressible, unique per seed)."""
    return rng.randbytes(size)
