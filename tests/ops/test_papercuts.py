"""The operator's papercuts (issue 39): each one as a person meets it, against real parts."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from daemon.advice import os_error_text
from daemon.cli import main
from daemon.config import HookSettings, load_settings
from daemon.emulator.hub import paid_conversions
from daemon.emulator.server import EmulatorServer
from daemon.jobs.model import Instance
from daemon.ops.progress import ProgressBar, fit
from daemon.ops.report import instance_alive, pid_runs
from daemon.outbox.publish import error_text
from daemon.pipeline.hooks import HookEvent, Hooks
from daemon.service import Outcome, instance_conflict, run_service
from tests.conftest import IN_CI, daemon_config
from tests.faults import job_rows
from tests.helpers import cli, daemon_in_process, wait_async
from tests.intake_support import running
from tests.scans import make_scan
from tests.tooling import free_port

BROKEN_PDF = b"%PDF-1.3\nThis is not a valid PDF file\n%%EOF\n"


def once(config: Path) -> Outcome:
    """``once`` in this process; its outcome."""
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    return outcome


def status_json(capsys: pytest.CaptureFixture[str], config: Path) -> dict[str, Any]:
    """``status --json --no-hub`` run in this process, parsed."""
    capsys.readouterr()
    assert main(["status", "--json", "--no-hub", "-c", str(config)]) == 0
    parsed: dict[str, Any] = json.loads(capsys.readouterr().out)
    return parsed


# -- status: failures that no longer stand, instances that no longer run --------------------


def test_status_drops_failures_fixed_by_a_corrected_file_or_deleted(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A failure fixed the documented way (a corrected file, same name) or whose input was
    deleted leaves ``status``; one that still stands stays; ``jobs`` keeps them all."""
    inbox = folders["inbox"]
    for name in ("fixed.pdf", "deleted.pdf", "standing.pdf"):
        (inbox / name).write_bytes(BROKEN_PDF)
    config = daemon_config(tmp_path, folders, emulator.url)
    assert sorted(once(config).failed) == ["deleted.pdf", "fixed.pdf", "standing.pdf"]
    (inbox / "fixed.pdf").write_bytes(make_scan("pdf", 5))
    (inbox / "deleted.pdf").unlink()
    assert once(config).completed == ["fixed.pdf"]
    shown = [job["path"] for job in status_json(capsys, config)["recent_failures"]]
    assert shown == ["standing.pdf"]
    capsys.readouterr()
    assert main(["status", "--no-hub", "-c", str(config)]) == 0
    text = capsys.readouterr().out
    assert "standing.pdf" in text
    assert "fixed.pdf" not in text
    assert "deleted.pdf" not in text
    assert "`ldx-hotfolder jobs --status failed` lists every failed job" in text
    capsys.readouterr()
    assert main(["jobs", "--status", "failed", "--json", "-c", str(config)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_status_lists_only_instances_that_run(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
) -> None:
    """A run that ended on a configuration error is not "alive" for a lease, nor listed for
    ever; the daemon that runs is (SQLite writes the row only at start and stop)."""
    refused = daemon_config(
        tmp_path, folders, emulator.url, instance_id="gone-one", hub={"engine": "nope/ocr"}
    )
    ended = cli(refused, "run")  # registered, then refused its settings
    assert ended.returncode == 2, ended.stderr
    config = daemon_config(tmp_path, folders, emulator.url, instance_id="live-one")
    with running(config, tmp_path / "daemon.log") as live:
        assert live.proc is not None
        payload = json.loads(cli(config, "status", "--json", "--no-hub").stdout)
        text = cli(config, "status", "--no-hub").stdout
    alive = {item["id"]: item["alive"] for item in payload["instances"]}
    assert alive == {"gone-one": False, "live-one": True}
    assert f"live-one (pid {live.proc.pid} on {socket.gethostname()}): running" in text
    assert "gone-one" not in text
    assert "(1 earlier run(s) that ended are not listed)" in text


def test_an_instance_is_alive_by_its_pid_on_this_host() -> None:
    """On this host the pid decides (not when the row was last written); elsewhere the lease."""
    here = socket.gethostname()
    started = time.time()  # written once, when this process was already running
    later = started + 3600  # far beyond any lease
    me = Instance("a", here, os.getpid(), started_at=started, seen_at=started)
    assert instance_alive(me, later, 30.0, here, pid_runs)
    reused = Instance("a", here, os.getpid(), started_at=0.0, seen_at=0.0)  # pid taken since
    assert not instance_alive(reused, time.time(), 30.0, here, pid_runs)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = Instance("a", here, child.pid, started_at=started, seen_at=time.time())
    assert not instance_alive(dead, time.time(), 30.0, here, pid_runs)
    elsewhere = Instance("a", "other-host", 1, started_at=started, seen_at=time.time() - 5)
    assert instance_alive(elsewhere, time.time(), 30.0, here, pid_runs)
    assert not instance_alive(elsewhere, time.time() + 60, 30.0, here, pid_runs)


# -- a second run on one host --------------------------------------------------------------


def test_a_second_run_on_the_same_host_names_the_running_pid(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """``run`` next to a running daemon: "already runs as pid N", exit 2, no talk of ids."""
    config = daemon_config(tmp_path, folders, emulator.url)
    with running(config, tmp_path / "daemon.log") as first:
        assert first.proc is not None
        second = cli(config, "run", timeout=60)
    assert second.returncode == 2
    assert f"ldx-hotfolder: ldx-hotfolder already runs as pid {first.proc.pid} on" in second.stderr
    assert "configuration error" not in second.stderr
    assert "instance_id" not in second.stderr.replace("(instance_id", "")


def test_a_running_sqlite_daemon_conflicts_long_after_its_lease() -> None:
    """On one host a live pid conflicts however old its row; an SQLite daemon never renews it."""
    row = Instance("vm", "host-a", 100, started_at=0.0, seen_at=0.0)
    problem = instance_conflict(row, "host-a", 200, 9e9, 30.0, alive=lambda pid: True)
    assert problem is not None
    assert problem.startswith("ldx-hotfolder already runs as pid 100 on host-a")
    assert "give each" not in problem
    shared = instance_conflict(row, "host-a", 200, 9e9, 30.0, alive=lambda pid: True, shared=True)
    assert shared is not None
    assert "give each its own instance_id" in shared


# -- the stalled clock survives a restart ---------------------------------------------------


def test_a_stalled_files_clock_survives_a_restart(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """An input waited on before a restart keeps its "waiting since" after it."""
    (folders["inbox"] / "placeholder.pdf").touch()
    config = daemon_config(tmp_path, folders, emulator.url, stalled_after=0.5)

    async def waited_since() -> float:
        async with daemon_in_process(load_settings(config)) as service:
            views = service.views
            await wait_async(views.waiting, 30, "the placeholder to show as stalled")
            return views.waiting()[0].since

    first = asyncio.run(waited_since())
    second = asyncio.run(waited_since())
    assert second == pytest.approx(first, abs=1e-6)


# -- words an office administrator follows --------------------------------------------------


def test_failed_file_operations_are_told_in_words() -> None:
    """A read-only disk, a permission, a full disk: the path and the reason, no errno."""
    cases = {
        errno.EROFS: "the disk is mounted read-only",
        errno.EACCES: "the daemon's user has no permission there",
        errno.ENOSPC: "the disk is full",
    }
    for number, words in cases.items():
        text = os_error_text(OSError(number, os.strerror(number), "/srv/out/a.docx"))
        assert text == f"/srv/out/a.docx: {words}"
        assert "Errno" not in text


def test_a_webhook_that_cannot_connect_is_told_in_words() -> None:
    """No receiver listening: the hook's failure says so, not "ConnectError: All connection..."."""
    failures: list[tuple[int, str]] = []
    url = f"http://127.0.0.1:{free_port()}/hook"
    settings = HookSettings(webhook_url=url, webhook_attempts=1)
    event = HookEvent(7, "failed", Path("/in/a.pdf"), "a.pdf", None, None, None, "x", "y", None)

    async def scenario() -> None:
        hooks = Hooks(settings, lambda job, message: failures.append((job, message)))
        hooks.fire(event)
        await hooks.drain(30)

    asyncio.run(scenario())
    ((job_id, message),) = failures
    assert job_id == 7
    assert message == (
        f"webhook {url} failed after 1 attempt(s): the receiver cannot be reached "
        "(no connection: is it running, is the URL right?)"
    )


def test_error_files_offer_retry_only_where_it_helps() -> None:
    """Too large: a corrected file, no retry; an automatic retry coming: said, with its time."""
    big = error_text("a.pdf", "too_large", "the file is 250.0 MB", 0.0, 3)
    assert "ldx-hotfolder retry" not in big
    assert "Retrying the same file cannot help: drop a corrected file" in big
    assert "Split it into smaller files" in big
    coming = error_text("a.pdf", "bad_response", "unreadable", 0.0, 3, auto_retry_at=1800.0)
    assert "tries it again by itself at 1970-01-01 00:30:00 UTC" in coming
    hub = error_text("a.pdf", "invalid_input", "The PDF file is damaged", 0.0, 3)
    assert "ldx-hotfolder retry 3" in hub
    assert "tries it again by itself" not in hub


def test_a_failure_that_is_retried_by_itself_says_so_and_is_paid_once(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Unreadable answers to a creation: one paid job, failed with the automatic retry named."""
    # The creation's answer (and every listing) is too large to read: the job was made, so
    # it is looked for, never created again.
    emulator.hub.update_knobs({"json_padding": 17 * 1024 * 1024})
    (folders["inbox"] / "a.png").write_bytes(make_scan("png", 8))
    config = daemon_config(tmp_path, folders, emulator.url, max_attempts=1)
    assert once(config).failed == ["a.png"]
    assert paid_conversions(emulator.hub.ledger()) == 1
    text = (folders["outbox"] / "a.png.error.txt").read_text(encoding="utf-8")
    assert "Code:   bad_response" in text
    assert "The daemon tries it again by itself at" in text
    assert "(auto_retry_after)" in text


def test_explain_does_not_name_an_error_file_that_could_not_be_written(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The output folder is a link, so no error file is written: explain says there is none."""
    (folders["inbox"] / "letters").mkdir()
    (folders["inbox"] / "letters" / "a.png").write_bytes(make_scan("png", 9))
    (tmp_path / "elsewhere").mkdir()
    (folders["outbox"] / "letters").symlink_to(tmp_path / "elsewhere")
    config = daemon_config(tmp_path, folders, emulator.url)
    assert once(config).failed == ["letters/a.png"]
    assert not list((tmp_path / "elsewhere").iterdir())
    capsys.readouterr()
    assert main(["explain", "--json", "letters/a.png", "-c", str(config)]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    lines = " ".join(report["reasons"])
    assert report["state"] == "failed"
    assert "No error file could be written" in lines
    assert "The error file is" not in lines
    assert "What to do: Replace the link with a real folder" in lines


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a read-only file system (a tmpfs mounted ro; root only)."""
    path = tmp_path / "ro"
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=False
        ).returncode
        == 0
    )
    if not mounted:
        if IN_CI:
            pytest.fail("CI must mount a read-only tmpfs (run as root)")
        pytest.skip("mounting a read-only tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_read_only_outbox_folder_is_told_in_words(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    read_only_folder: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A failed input whose outbox folder is read-only: the log says so in words, explain says
    no error file was written."""
    (folders["inbox"] / "bad.pdf").write_bytes(BROKEN_PDF)
    config = daemon_config(tmp_path, folders, emulator.url)
    settings = load_settings(config)

    async def scenario() -> None:
        async with daemon_in_process(settings):
            # The outbox turns read-only while the daemon runs (a remount, a full quota...).
            subprocess.run(
                ["mount", "--bind", str(read_only_folder), str(folders["outbox"])], check=True
            )
            try:
                db = folders["state"] / "state.db"
                await wait_async(lambda: any(r["status"] == "failed" for r in job_rows(db)), 30)
            finally:
                subprocess.run(["umount", str(folders["outbox"])], check=False)

    capsys.readouterr()
    asyncio.run(scenario())
    log = capsys.readouterr()
    said = log.out + log.err
    assert "cannot write the error file" in said
    assert "the disk is mounted read-only" in said
    assert "Errno" not in said
    assert not (folders["outbox"] / "bad.pdf.error.txt").exists()
    capsys.readouterr()
    assert main(["explain", "bad.pdf", "-c", str(config)]) == 0
    assert "No error file could be written" in capsys.readouterr().out


# -- the progress bar ----------------------------------------------------------


def test_the_progress_bar_keeps_the_time_and_lets_log_lines_pass_whole() -> None:
    """At 80 columns the elapsed time shows whole; a long log line prints above, unbroken."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    bar = ProgressBar(console)
    line = "a log line " + "x" * 150 + " end"
    with bar:
        bar.update({"queued": 1234, "processing": 56, "completed": 10000, "failed": 789})
        print(line, file=sys.stderr)
        bar.refresh()
    shown = buffer.getvalue().replace("\r", "\n").split("\n")
    drawn = [s.replace("\x1b[2K", "") for s in shown if "converting" in s and "queued" in s]
    assert drawn
    for text in drawn:
        assert len(text) <= 80
        assert "0:00:0" in text  # the elapsed time, whole
        assert "10789/12079" in text
    assert any(line in s for s in shown)  # one line, no break inserted


def test_fit_gives_way_with_the_bar_then_the_counts() -> None:
    """A wide terminal gets the full bar and counts; a narrow one a short bar, then "…"."""
    counts = "1 queued · 2 processing · 3 completed · 4 failed"
    assert fit(200, 7, 10, counts) == (40, counts)
    bar, text = fit(80, 7, 10, counts)
    assert 5 <= bar < 40
    assert text == counts
    bar, text = fit(50, 7, 10, counts)
    assert bar == 5
    assert text.endswith("…")
    assert len("converting") + bar + len("7/10") + 8 + 4 + len(text) <= 50
