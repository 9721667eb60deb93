"""Commands that only look never create a state database, and read one they may not write."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.helpers import Daemon, cli, jobs_json, wait_for
from tests.scans import make_scan

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork


def _drop_file_override() -> None:
    """In the child, before exec: give up the capabilities that ignore file modes."""
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if _LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))


# Root writes any folder anyway: the reader runs without those capabilities.
AS_READER: Callable[[], None] | None = _drop_file_override if os.geteuid() == 0 else None


def read(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``ldx-hotfolder ARGS -c CONFIG`` as a user who may read the state but not write it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDX_HOTFOLDER_")}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        preexec_fn=AS_READER,  # only a prctl call
        check=False,
    )


def read_only(folder: Path) -> None:
    """The folder and every file in it: readable, not writable."""
    for path in folder.iterdir():
        if not path.is_socket():
            path.chmod(0o444)
    folder.chmod(0o555)


def writable(folder: Path) -> None:
    folder.chmod(0o750)
    for path in folder.iterdir():
        if not path.is_socket():
            path.chmod(0o640)


def test_a_mistyped_state_db_is_said_never_created(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """jobs and status say there is no database (and show an empty queue); explain and db
    version refuse with exit 2; none of them creates a file."""
    typo = folders["state"] / "stat.db"
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9", state_db=str(typo))
    jobs = cli(config, "jobs", "--json")
    assert (jobs.returncode, json.loads(jobs.stdout)) == (0, [])
    assert f"the state database {typo} does not exist" in jobs.stderr
    status = cli(config, "status", "--no-hub")
    assert status.returncode == 0
    assert f"state    the state database {typo} does not exist" in status.stdout
    as_json = json.loads(cli(config, "status", "--json", "--no-hub").stdout)
    assert str(typo) in as_json["state_db_missing"]
    for args in (("explain", str(folders["inbox"])), ("db", "version")):
        refused = cli(config, *args)
        assert refused.returncode == 2, args
        assert "does not exist: check state_db" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert list(folders["state"].iterdir()) == []


def test_the_state_is_read_from_a_folder_the_reader_cannot_write(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A reader who may not write the state folder sees the jobs: of a stopped daemon (the
    database alone) and of a running one (through its write-ahead log), without a
    traceback and without leaving a file."""
    config = daemon_config(tmp_path, folders, emulator.url)
    (folders["inbox"] / "first.png").write_bytes(make_scan("png", seed=1))
    assert cli(config, "once").returncode == 0
    state = folders["state"]
    before = sorted(p.name for p in state.iterdir())
    read_only(state)
    try:
        expected = {
            ("jobs", "--json"): '"path": "first.png"',
            ("status", "--json", "--no-hub"): '"completed": 1',
            ("db", "version"): "schema version",
        }
        for args, words in expected.items():
            result = read(config, *args)
            assert result.returncode == 0, (args, result.stderr)
            assert words in result.stdout, args
        explained = read(config, "explain", str(folders["inbox"] / "first.png"))
        assert explained.returncode == 0, explained.stderr
        assert "first.png" in explained.stdout
        assert sorted(p.name for p in state.iterdir()) == before  # nothing made
    finally:
        writable(state)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        (folders["inbox"] / "second.png").write_bytes(make_scan("png", seed=2))
        wait_for(lambda: len(jobs_json(config)) == 2, 60, "the second job")
        read_only(state)  # the daemon (root, or the owner) still writes; the reader cannot
        try:
            result = read(config, "jobs", "--json")
        finally:
            writable(state)
    finally:
        assert daemon.stop() == 0
    assert result.returncode == 0, result.stderr
    assert sorted(job["path"] for job in json.loads(result.stdout)) == ["first.png", "second.png"]
