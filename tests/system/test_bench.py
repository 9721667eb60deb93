"""A smoke run of the performance benchmarks (bench/perf.py): they run and print a table.

No timing is asserted: the suite runs on shared, noisy machines, and at this scale the
numbers mean nothing. The real runs are made by hand (see README, "Performance").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import economy, harness, perf, scenarios, soak
from bench.harness import MiB, process_tree, stop_and_reap


@pytest.mark.timeout(300)  # nine scenarios, each starting real processes
def test_every_benchmark_runs_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every scenario completes at a tiny scale and lands in the table."""
    assert perf.main(["--runs", "1", "--scale", "0.002", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for plan in perf.PLANS:
        for measure in plan.measures:
            assert f"{plan.title}: {measure.label}" in out, measure.key


def test_peak_rss_is_the_childs_own_not_its_parents() -> None:
    """The bench reports a process's own peak RSS, even when the bench itself is bigger."""
    # On Linux a child's ru_maxrss starts from its parent's RSS.
    ballast = bytearray(256 * MiB)  # the parent, larger than the child will ever be
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touched, so resident
    child = "b = bytearray(64 * 2**20); b[::4096] = b'\\x01' * len(b[::4096]); "
    child += "print('ready', flush=True); import sys; sys.stdin.read()"
    with subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        peak = stop_and_reap(proc, signal.SIGTERM, timeout=30)
    del ballast
    assert 64 * MiB <= peak < 160 * MiB


def test_each_run_folder_is_removed_once_measured(tmp_path: Path) -> None:
    """A scenario's run folder is gone after its run, measured or failed; the corpus stays."""
    seen: list[Path] = []

    def scenario(ctx: scenarios.Context) -> dict[str, float]:
        ctx.work.mkdir(parents=True)
        (ctx.work / "output.docx").write_bytes(b"x" * 1024)
        seen.append(ctx.work)
        if len(seen) == 2:
            raise RuntimeError("the second run fails")
        return {"files": 1.0}

    ctx = scenarios.Context(tmp_path)
    ctx.corpus.mkdir()
    plan = perf.Plan("z", "folders", scenario)
    assert perf.run_plan(plan, ctx, 1) == [{"files": 1.0}]
    assert perf.run_plan(plan, ctx, 1) == []  # the failed run is reported, not counted
    assert len(seen) == 2
    assert not any(path.exists() for path in seen)
    assert ctx.corpus.is_dir()


def test_a_failed_run_is_left_out_of_the_table_and_its_count_shown() -> None:
    """A row measured in fewer runs than asked says how many; its median is of those."""
    plan = perf.Plan(
        "z", "t", lambda ctx: {}, [perf.Measure("x", "x", "{:.1f}", "≤ 2", perf._at_most(2))]
    )
    table = perf.table([(plan, [{"x": 1.0}, {"x": 3.0}])], runs=3)
    assert "| z | t: x | 2.0 | 1.0-3.0 (n=2) | ≤ 2 | yes |" in table


def test_emulator_files_go_to_a_tmpfs_with_room_else_beside_the_run(tmp_path: Path) -> None:
    """An emulator keeps its files off the daemon's disk when a tmpfs has room, else in the run."""
    ram = tmp_path / "shm"
    ram.mkdir()
    first = harness.hub_data_dir(tmp_path / "run" / "data", tmpfs=ram)
    second = harness.hub_data_dir(tmp_path / "run" / "data", tmpfs=ram)
    assert first.parent == ram
    assert second.parent == ram
    assert first != second
    fallback = harness.hub_data_dir(tmp_path / "run" / "data", tmpfs=tmp_path / "missing")
    assert fallback == tmp_path / "run" / "data"
    assert fallback.is_dir()


def test_bracketed_reference_cancels_a_steady_drift() -> None:
    """A daemon run between two reference runs is set against their mean (CPU or wall) time."""
    # The machine slowed steadily from 6 s to 8 s per reference run: mid-way it took 7 s.
    assert scenarios.bracketed(6.0, 8.0) == pytest.approx(7.0)
    assert scenarios.bracketed(8.0, 6.0) == pytest.approx(7.0)


@pytest.mark.timeout(300)  # real processes, a few restarts
def test_soak_runs_with_kills_and_reports_flat_resources(tmp_path: Path) -> None:
    """A short soak with SIGKILLs completes every input once and prints its table."""
    result = soak.run(tmp_path, minutes=0.4, rate=3.0, kill_every=6.0, seed=2)
    assert result.kills >= 1
    assert result.completed == result.files >= 50
    assert len({s.life for s in result.samples}) == result.kills + 1
    table = result.table()
    assert f"{result.files} files, {result.kills} SIGKILLs" in table
    assert "MB/h" in table


def test_slope_is_least_squares() -> None:
    """The soak's slope is the least-squares line's, and 0 for a single instant."""
    assert soak.slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert soak.slope([0, 1, 2], [5, 4, 6]) == pytest.approx(0.5)
    assert soak.slope([4, 4], [1, 9]) == 0.0


def test_set_takes_toml_values_and_refuses_garbage() -> None:
    """``perf --set`` reads each KEY=VALUE as TOML and rejects what is not."""
    assert harness.parse_settings(["use_polling=false", "max_in_flight=64"]) == {
        "use_polling": False,
        "max_in_flight": 64,
    }
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        harness.parse_settings(["use_polling"])


def test_process_tree_includes_grandchildren() -> None:
    """The daemon's tree holds its children's children (CPU and RSS count them all)."""
    script = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], "
        "stdin=subprocess.PIPE); print(p.pid, flush=True); sys.stdin.read(); p.stdin.close(); "
        "p.wait()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdin is not None
        grandchild = int(proc.stdout.readline())
        tree = process_tree(os.getpid())
        proc.stdin.close()
        proc.wait(30)
    assert proc.pid in tree
    assert grandchild in tree


def test_a_timed_span_ends_at_the_rename_that_published_the_last_output(tmp_path: Path) -> None:
    """The publishing rename sets the end of a span; temporary and error files do not."""
    outbox = tmp_path / "out"
    (outbox / "a").mkdir(parents=True)
    tmp = outbox / "a" / ".scan.docx.tmp"
    tmp.write_bytes(b"written before the drop")
    written = harness.change_time(tmp)
    marks = iter(tmp_path / f"dropped-{n}" for n in range(100_000))
    started = harness.mark(next(marks))
    while started <= written:  # until the file clock has moved on (a tick at most)
        started = harness.mark(next(marks))
    os.replace(tmp, outbox / "a" / "scan.docx")
    (outbox / "a" / "scan.pdf.error.txt").write_text("later, not an output")
    (outbox / "a" / ".other.docx.tmp").write_bytes(b"later, not published")
    end = harness.last_published(outbox)
    assert end >= started
    assert end == harness.change_time(outbox / "a" / "scan.docx")


def test_job_lengths_shrink_with_the_scale_but_never_grow_or_vanish() -> None:
    """The emulator's job lengths scale down with --scale, never past the real ones or 0."""
    assert scenarios.processing_range(30, 90, 1.0) == "30-90"
    assert scenarios.processing_range(30, 90, 0.1) == "3-9"
    assert scenarios.processing_range(3, 8, 4.0) == "3-8"
    assert scenarios.processing_range(3, 8, 0.002) == "0.05-0.05"
    assert scenarios.Context(Path("/x"), scale=0.5).jobs(30, 90) == "15-45"


def test_written_bytes_counts_what_a_process_writes_to_a_file(tmp_path: Path) -> None:
    """/proc/PID/io's write_bytes grows by what the process writes and syncs to a file."""
    before = harness.written_bytes(os.getpid())
    with (tmp_path / "data").open("wb") as out:
        out.write(b"x" * (1024 * 1024))
        out.flush()
        os.fsync(out.fileno())
    assert harness.written_bytes(os.getpid()) - before >= 1024 * 1024


def test_a_none_setting_is_left_to_the_daemons_default(tmp_path: Path) -> None:
    """write_config leaves out a setting given as None, so the daemon's default applies."""
    folders = harness.Folders(tmp_path).make()
    path = harness.write_config(
        folders, "http://127.0.0.1:1", hub={"max_requests_per_minute": None}, ignore=None
    )
    text = path.read_text()
    assert "max_requests_per_minute" not in text
    assert "ignore" not in text
    assert 'base_url = "http://127.0.0.1:1"' in text
    unlimited = harness.write_config(folders, "http://127.0.0.1:1").read_text()
    assert "max_requests_per_minute = 0" in unlimited


def test_min_poll_gap_is_per_job_and_ignores_other_routes() -> None:
    """The shortest poll gap compares polls of one job only; listings do not count."""
    poll, listing = economy.POLL_ROUTE, "GET /renderocr/jobs"
    events = [
        {"route": poll, "path": "/renderocr/jobs/a", "at": 10.0},
        {"route": poll, "path": "/renderocr/jobs/b", "at": 10.1},
        {"route": listing, "path": "/renderocr/jobs", "at": 10.2},
        {"route": poll, "path": "/renderocr/jobs/a", "at": 12.5},
        {"route": poll, "path": "/renderocr/jobs/b", "at": 11.6},
    ]
    assert economy.min_poll_gap(events) == pytest.approx(1.5)
    assert economy.min_poll_gap(events[:3]) == float("inf")


def test_finished_counts_requests_failures_and_minutes(tmp_path: Path) -> None:
    """A side-by-side run's numbers: requests per file, failed jobs, minutes to the last end."""
    ledger = {
        "requests": {"POST /files": 4, "GET /renderocr/jobs/{job_id}": 6},
        "refused": {"POST /files": 1},
        "jobs": [],
    }
    rows = [
        {"status": "completed", "finished_at": 1090.0},
        {"status": "failed", "finished_at": 1150.0},
        {"status": "queued", "finished_at": None},
    ]
    done = economy.Finished(2, 1000.0, ledger, rows, tmp_path)
    assert done.requests_per_file == pytest.approx(5.0)
    assert done.failed == 1
    assert done.minutes == pytest.approx(2.5)
    assert "refused 1" in done.summary()
