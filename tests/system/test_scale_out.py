"""Several daemons on one inbox and one state database, one of them killed mid-run.

Real subprocesses (``ldx-hotfolder run``), a real PostgreSQL server, the emulator on
loopback, SIGKILL. Leases are short (3 s) so that a takeover happens within the test.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from bench.scale import Cluster, timed_run
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.outbox.layout import TEMP_MARKER
from tests.faults import outbox_files
from tests.helpers import wait_for
from tests.scans import drop_scans

FILES = 300
LEASE = 3.0
SETTINGS = {"max_in_flight": 8, "lease_seconds": LEASE}


def _in_flight(rows: list[dict[str, Any]], owner: str) -> dict[int, float]:
    """Jobs ``owner`` holds (unfinished, lease set): id -> lease expiry."""
    return {
        row["id"]: row["lease_until"]
        for row in rows
        if row["owner"] == owner
        and row["stage"] not in ("done", "failed")
        and row["lease_until"] is not None
    }


def _events(log: str, event: str) -> list[dict[str, Any]]:
    found = []
    for line in log.splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _assert_each_output_once(
    inputs: list[str], rows: list[dict[str, Any]], outbox: Path, hub: EmulatorServer
) -> None:
    done = {row["path"]: row for row in rows if row["status"] == "completed"}
    assert sorted(done) == sorted(inputs), "every input completed, once"
    assert len(rows) == len(inputs), "one job per input"
    outputs = outbox_files(outbox)
    assert not [p for p in outputs if TEMP_MARKER in p], "no temporary file left"
    assert sorted(row["output"] for row in done.values()) == outputs, "one output per input"
    for row in done.values():
        served = hub.hub.open_download(row["output_file_id"]).path.read_bytes()
        assert (outbox / row["output"]).read_bytes() == served, row["path"]


def _kill_mid_run(cluster: Cluster, victim: int, name: str) -> dict[int, float]:
    """Wait until a third of the work is done and ``name`` holds jobs; SIGKILL it.
    Return the jobs it held when it died (id -> lease expiry)."""
    wait_for(
        lambda: (
            (rows := cluster.rows())
            and sum(r["status"] == "completed" for r in rows) >= FILES // 3
            and len(_in_flight(rows, name)) >= 2
        ),
        60,
        f"{name} mid-run with jobs in flight",
        interval=0.05,
    )
    cluster.daemons[victim].kill()
    return _in_flight(cluster.rows(), name)


def _remote_ids(rows: list[dict[str, Any]], ids: Any) -> dict[int, str]:
    """The remote job ids already known for ``ids``."""
    return {r["id"]: r["remote_job_id"] for r in rows if r["id"] in ids and r["remote_job_id"]}


@pytest.mark.timeout(180)
def test_three_instances_one_killed_convert_every_file_exactly_once(
    tmp_path: Path, pg_url: str
) -> None:
    """3 daemons, 300 files, one SIGKILLed: 300 outputs, once each, in fair shares."""
    # Remote jobs <= 300 + the killed one's jobs in flight; the others finish those after its lease.
    settings = EmulatorSettings(processing_time=(0.3, 0.8), seed=5)
    with EmulatorServer(settings) as hub:
        cluster = Cluster(tmp_path, pg_url, hub.url)
        cluster.start(["node-1", "node-2", "node-3"], **SETTINGS)
        inputs = drop_scans(cluster.inbox, FILES, seed=5, folders=4)
        held = _kill_mid_run(cluster, 2, "node-3")
        submitted = _remote_ids(cluster.rows(), held)
        wait_for(lambda: cluster.completed() >= FILES, 90, "every job completed", 0.2)
        assert cluster.stop() == [0, 0]
        rows = cluster.rows()
        _assert_each_output_once(inputs, rows, cluster.outbox, hub)
        ledger = hub.hub.ledger()
        remote_jobs, uploads = len(ledger["jobs"]), len(ledger["uploads"])
    by_id = {row["id"]: row for row in rows}
    assert held, "the killed instance had jobs in flight"
    assert remote_jobs <= FILES + len(held), f"{remote_jobs} remote jobs > {FILES} + {len(held)}"
    assert uploads <= FILES + len(held)
    # A job whose remote id was known resumed by polling it: same remote job, no new one.
    assert {job_id: by_id[job_id]["remote_job_id"] for job_id in submitted} == submitted
    takeovers = {}
    for daemon in cluster.daemons[:2]:
        for record in _events(daemon.log(), "took over a job whose lease expired"):
            takeovers[record["job_id"]] = record
    for job_id, lease_until in held.items():
        assert by_id[job_id]["owner"] in ("node-1", "node-2"), "finished by a survivor"
        record = takeovers[job_id]
        assert record["previous_instance"] == "node-3"
        assert _epoch(record["timestamp"]) >= lease_until, "taken over after the lease"
    shares = dict.fromkeys(("node-1", "node-2", "node-3"), 0)
    for row in rows:
        shares[row["owner"]] += 1
    assert shares["node-3"] > 0
    for name in ("node-1", "node-2"):
        assert shares[name] >= 0.2 * FILES, f"fair share: {shares}"
    print(
        f"\nscale-out: {FILES} files, {remote_jobs} remote jobs (bound {FILES + len(held)}), "
        f"{uploads} uploads, {len(held)} jobs taken over from node-3 ({len(submitted)} "
        f"already submitted, resumed by polling); completed per instance {shares}"
    )


@pytest.mark.timeout(180)
def test_one_instance_on_sqlite_killed_and_restarted_converts_every_file_once(
    tmp_path: Path,
) -> None:
    """On SQLite, one instance killed, restarted under its id: 300 outputs, remote jobs bounded."""
    # The same run as above, on a single instance; on restart it takes its own jobs back at once.
    settings = EmulatorSettings(processing_time=(0.3, 0.8), seed=6)
    url = f"sqlite:///{tmp_path / 'state' / 'state.db'}"
    (tmp_path / "state").mkdir()
    with EmulatorServer(settings) as hub:
        cluster = Cluster(tmp_path, url, hub.url)
        cluster.start(["solo"], **SETTINGS)
        inputs = drop_scans(cluster.inbox, FILES, seed=6, folders=4)
        held = _kill_mid_run(cluster, 0, "solo")
        cluster.daemons = []
        cluster.start(["solo"], **SETTINGS)
        wait_for(lambda: cluster.completed() >= FILES, 90, "every job completed", 0.2)
        assert cluster.stop() == [0]
        rows = cluster.rows()
        _assert_each_output_once(inputs, rows, cluster.outbox, hub)
        remote_jobs = len(hub.hub.ledger()["jobs"])
    assert held
    assert remote_jobs <= FILES + len(held)
    assert {row["owner"] for row in rows} == {"solo"}
    restarted = cluster.root / "solo" / "daemon.log"
    assert "took over a job" not in restarted.read_text(encoding="utf-8")


def test_scale_benchmark_runs_at_a_tiny_scale(tmp_path: Path, pg_url: str) -> None:
    """bench/scale.py's timed run completes 12 files with two instances (no timing)."""
    with EmulatorServer(EmulatorSettings(processing_time=0.1, seed=2)) as hub:
        seconds = timed_run(tmp_path, pg_url, hub.url, instances=2, files=12, max_in_flight=2)
    assert seconds > 0
