"""One state database for several instances: schema versions, claims, leases, intake.

Every test that takes ``db_url`` runs on an SQLite file and on a real PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

from daemon.errors import LeaseLost, SchemaMismatch, StateUnavailable
from daemon.jobs import schema
from daemon.jobs.model import Instance, NewJob, Stage
from daemon.jobs.store import Store
from daemon.jobs.tables import metadata
from daemon.jobs.views import Views
from daemon.jobs.writer import Writer
from daemon.ops import metrics
from daemon.outbox import reconcile
from daemon.service import instance_conflict
from tests.conftest import daemon_config
from tests.helpers import cli, enqueue, reject

# What the code before schema versions created (sqlite3 .schema of a fresh state.db).
LEGACY_SCHEMA = """
CREATE TABLE jobs (
    id INTEGER NOT NULL, path TEXT NOT NULL, size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL, inode BIGINT NOT NULL, input_format VARCHAR(8),
    sha256 VARCHAR(64), status VARCHAR(16) NOT NULL, stage VARCHAR(16) NOT NULL,
    engine VARCHAR(100) NOT NULL, language VARCHAR(40) NOT NULL,
    output_format VARCHAR(8) NOT NULL, on_success VARCHAR(16), rule TEXT, hook_error TEXT,
    output TEXT, remote_file_id VARCHAR(64), remote_job_id VARCHAR(64),
    output_file_id VARCHAR(64), attempts INTEGER NOT NULL, submits INTEGER NOT NULL,
    rearms INTEGER NOT NULL, next_attempt_at FLOAT, error_code VARCHAR(64),
    error_message TEXT, created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL,
    finished_at FLOAT, PRIMARY KEY (id)
);
CREATE INDEX ix_jobs_path ON jobs (path);
CREATE INDEX ix_jobs_sha256 ON jobs (sha256);
CREATE INDEX ix_jobs_output ON jobs (output);
CREATE INDEX ix_jobs_stage ON jobs (stage);
CREATE INDEX ix_jobs_status ON jobs (status);
CREATE TABLE waiting (
    path TEXT NOT NULL, code VARCHAR(32) NOT NULL, reason TEXT NOT NULL,
    since FLOAT NOT NULL, noted_at FLOAT NOT NULL, PRIMARY KEY (path)
);
"""
LEGACY_ROW = (
    "INSERT INTO jobs (path, size, mtime_ns, inode, status, stage, engine, language, "
    "output_format, output, remote_job_id, attempts, submits, rearms, created_at, "
    "updated_at) VALUES (?, 10, 1, 7, ?, ?, 'ki/ocr', 'jpn', 'docx', ?, ?, 0, 1, 0, 1.0, 2.0)"
)


def new(path: str = "a/scan.pdf", size: int = 10, mtime_ns: int = 1) -> NewJob:
    return NewJob(path, size, mtime_ns, 7, "pdf", "ki/ocr", "jpn", "docx")


@pytest.fixture
def two(db_url: str) -> Iterator[tuple[Store, Store]]:
    """Two stores on one database, as two instances would have."""
    first, second = Store(db_url), Store(db_url)
    yield first, second
    first.close()
    second.close()


def test_an_empty_database_gets_the_schema_of_the_code(db_url: str) -> None:
    """The migrations build exactly the tables, columns and indexes the code declares."""
    store = Store(db_url)
    try:
        found = inspect(store.engine)
        assert set(found.get_table_names()) == set(metadata.tables)
        for name, table in metadata.tables.items():
            assert {c["name"] for c in found.get_columns(name)} == set(table.columns.keys())
            declared = {(i.name, i.unique) for i in table.indexes}
            assert {(i["name"], bool(i["unique"])) for i in found.get_indexes(name)} == declared
        assert schema.current(store.engine) == schema.HEAD
    finally:
        store.close()


def test_claims_are_exclusive_until_the_lease_expires(two: tuple[Store, Store]) -> None:
    """A claimed job is nobody else's while its lease runs; then another takes it over."""
    a, b = two
    ids = [enqueue(a, new(f"s{i}.pdf"), f"s{i}.docx", now=1.0).id for i in range(5)]
    mine = a.claim(10.0, 3, [], "a", lease=5.0)
    assert [c.job.id for c in mine] == ids[:3]
    assert all(c.job.owner == "a" and c.job.lease_until == 15.0 for c in mine)
    assert not any(c.taken_over for c in mine)
    theirs = b.claim(11.0, 10, [], "b", lease=5.0)
    assert [c.job.id for c in theirs] == ids[3:]
    assert b.claim(14.0, 10, [c.job.id for c in theirs], "b", lease=5.0) == []
    assert Views(b).held(14.0) == {"a": 3, "b": 2}
    taken = b.claim(16.0, 10, [c.job.id for c in theirs], "b", lease=5.0)
    assert [c.job.id for c in taken] == ids[:3]
    assert all(c.taken_over and c.previous_owner == "a" for c in taken)
    with pytest.raises(LeaseLost):
        a.advance(ids[0], Stage.UPLOADING, 17.0, current=mine[0].job, owner="a")
    moved = b.advance(ids[0], Stage.UPLOADING, 17.0, current=taken[0].job, owner="b")
    assert moved.stage is Stage.UPLOADING
    assert a.renew("a", ids[:3], 30.0, 17.0) == set(ids[:3])  # a learns it lost them


def test_renewed_leases_hold_and_released_ones_are_free(two: tuple[Store, Store]) -> None:
    """Renewal keeps a job past its first lease; a clean stop frees it at once."""
    a, b = two
    job = enqueue(a, new(), "a/scan.docx", now=1.0)
    assert job is not None
    a.claim(10.0, 1, [], "a", lease=5.0)
    assert a.renew("a", [job.id], 40.0, 12.0) == set()
    assert b.claim(20.0, 1, [], "b", lease=5.0) == []
    assert b.next_due("b") == 40.0  # b wakes up when a's lease would expire
    assert a.release("a") == 1
    assert [c.job.id for c in b.claim(21.0, 1, [], "b", lease=5.0)] == [job.id]


def test_a_restarted_instance_takes_its_own_jobs_back_at_once(two: tuple[Store, Store]) -> None:
    """Jobs held under this instance's id before a crash are claimable by it at once."""
    a, b = two
    job = enqueue(a, new(), "a/scan.docx", now=1.0)
    assert job is not None
    a.claim(10.0, 1, [], "a", lease=30.0)
    assert b.claim(11.0, 1, [], "b", lease=30.0) == []
    again = b.claim(11.0, 1, [], "a", lease=30.0)  # a's next run, with a new connection
    assert [c.job.id for c in again] == [job.id]
    assert not again[0].taken_over


def test_one_version_of_an_input_is_inserted_once(two: tuple[Store, Store]) -> None:
    """Two instances queueing the same version: the first insert wins, the second is None."""
    a, b = two
    assert enqueue(a, new(), "a/scan.docx", now=1.0) is not None
    assert enqueue(b, new(), "a/scan.docx", now=1.1) is None
    assert reject(b, new(), "a/scan.docx", "bad", "bad", now=1.2) is None
    assert enqueue(b, new(mtime_ns=2), "a/scan.docx", now=1.3) is not None  # a new version
    assert len(Views(a).jobs()) == 2


def test_concurrent_claims_never_share_a_job(db_url: str) -> None:
    """Four instances claiming at once from one queue get disjoint jobs, all of them."""
    first = Store(db_url)
    for i in range(200):
        enqueue(first, new(f"s{i}.pdf"), f"s{i}.docx", now=1.0)
    stores = [first] + [Store(db_url) for _ in range(3)]
    got: dict[str, list[int]] = {f"i{n}": [] for n in range(4)}
    barrier = threading.Barrier(4)

    def claim_all(store: Store, name: str) -> None:
        barrier.wait()
        while True:
            claims = store.claim(10.0, 7, got[name], name, lease=60.0)
            if not claims:
                return
            got[name] += [c.job.id for c in claims]

    threads = [threading.Thread(target=claim_all, args=(s, f"i{n}")) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    claimed = [job_id for ids in got.values() for job_id in ids]
    assert sorted(claimed) == sorted({j.id for j in Views(first).jobs()}), "each job claimed once"
    for store in stores:
        store.close()


def _legacy_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript(LEGACY_SCHEMA)
        conn.execute(LEGACY_ROW, ("a.pdf", "completed", "done", "a.docx", "r" * 32))
        conn.execute(LEGACY_ROW, ("b.pdf", "processing", "submitted", "b.docx", "s" * 32))
        # The same version of c.pdf twice (changed and changed back): allowed back then.
        conn.execute(LEGACY_ROW, ("c.pdf", "completed", "done", "c.docx", "t" * 32))
        conn.execute(LEGACY_ROW, ("c.pdf", "completed", "done", "c.docx", "u" * 32))


def test_a_database_from_before_versions_is_upgraded_keeping_every_job(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """Old SQLite file: read commands exit 2 saying to upgrade; ``db upgrade`` keeps every row."""
    # The upgraded rows are resumable; a second upgrade changes nothing.
    db = folders["state"] / "state.db"
    _legacy_sqlite(db)
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9")
    refused = cli(config, "jobs")
    assert refused.returncode == 2
    assert "older than this ldx-hotfolder" in refused.stderr
    assert "ldx-hotfolder db upgrade" in refused.stderr
    upgraded = cli(config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "from schema version 1 to 3" in upgraded.stdout
    assert "up to date" in cli(config, "db", "upgrade").stdout
    store = Store(f"sqlite:///{db}")
    try:
        jobs = {(j.path, j.remote_job_id): j for j in Views(store).jobs()}
        assert len(jobs) == 4
        assert jobs[("b.pdf", "s" * 32)].stage is Stage.SUBMITTED  # resumes by polling
        assert jobs[("c.pdf", "u" * 32)].inode == 7  # the newest twin keeps its version
        assert store.versions()["c.pdf"] == (10, 1, 7)
        claimed = store.claim(10.0, 10, [], "me", lease=30.0)
        assert [c.job.path for c in claimed] == ["b.pdf"]
    finally:
        store.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_the_daemon_upgrades_its_own_sqlite_file(tmp_path: Path) -> None:
    """A daemon on one machine upgrades its SQLite file itself (Store(upgrade=True))."""
    db = tmp_path / "state.db"
    _legacy_sqlite(db)
    store = Store(f"sqlite:///{db}", upgrade=True)
    try:
        assert schema.current(store.engine) == schema.HEAD
        assert len(Views(store).jobs()) == 4
    finally:
        store.close()


def test_an_older_shared_database_stops_the_daemon(
    tmp_path: Path, folders: dict[str, Path], pg_url: str
) -> None:
    """An older PostgreSQL schema: ``once`` exits 2 and names ``db upgrade``, which then works."""
    # A shared database is never upgraded behind the other instances' backs.
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        schema.MIGRATIONS[0](conn)
    engine.dispose()
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9", state_db=pg_url)
    refused = cli(config, "once")
    assert refused.returncode == 2
    assert "run `ldx-hotfolder db upgrade`" in refused.stderr
    assert cli(config, "db", "upgrade").returncode == 0
    assert f"schema version {schema.HEAD}" in cli(config, "db", "version").stdout


def test_a_newer_schema_is_refused_with_a_clear_message(
    tmp_path: Path, folders: dict[str, Path], db_url: str
) -> None:
    """A database upgraded by a newer ldx-hotfolder: every command exits 2 and says so."""
    Store(db_url).close()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = 99"))
    engine.dispose()
    with pytest.raises(SchemaMismatch, match="newer than this ldx-hotfolder"):
        Store(db_url, upgrade=True)
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9", state_db=db_url)
    for args in (("jobs",), ("db", "upgrade"), ("once",)):
        result = cli(config, *args)
        assert result.returncode == 2, args
        assert "schema version 99, newer than this ldx-hotfolder" in result.stderr


def test_jobs_and_status_show_which_instance_holds_which_job(
    tmp_path: Path, folders: dict[str, Path], db_url: str
) -> None:
    """``jobs`` (text and JSON) and ``status`` (text and JSON) name the holder of a job."""
    store = Store(db_url)
    try:
        held = enqueue(store, new("held.pdf"), "held.docx", now=1.0)
        free = enqueue(store, new("free.pdf"), "free.docx", now=1.0)
        assert held is not None
        assert free is not None
        store.register_instance("node-7", "host-a", 4242, now=9e9)
        store.claim(9e9, 1, [], "node-7", lease=30.0)
    finally:
        store.close()
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9", state_db=db_url)
    text_jobs = cli(config, "jobs").stdout
    assert "held.pdf" in text_jobs
    assert "[held by node-7]" in text_jobs
    assert text_jobs.count("held by") == 1
    by_path = {j["path"]: j for j in json.loads(cli(config, "jobs", "--json").stdout)}
    assert by_path["held.pdf"]["instance"] == "node-7"
    assert by_path["held.pdf"]["held"]
    assert by_path["free.pdf"]["instance"] is None
    assert not by_path["free.pdf"]["held"]
    status = cli(config, "status", "--no-hub").stdout
    assert "node-7 (pid 4242 on host-a)" in status
    assert "holds 1 job(s)" in status
    payload = json.loads(cli(config, "status", "--no-hub", "--json").stdout)
    assert payload["instances"][0]["id"] == "node-7"
    assert payload["instances"][0]["jobs_held"] == 1


def test_instance_ids_in_use_are_refused() -> None:
    """A live instance under the same id stops a new one; an earlier run of this one does not."""
    # Live means on another host, or another live process on this one.
    row = Instance("n1", "host-a", 100, started_at=0.0, seen_at=50.0)
    alive = {100}.__contains__
    assert instance_conflict(None, "host-a", 200, 55.0, 30.0) is None
    assert instance_conflict(row, "host-a", 200, 90.0, 30.0) is None  # not seen for a lease
    assert instance_conflict(row, "host-a", 200, 55.0, 30.0, alive=lambda pid: False) is None
    assert instance_conflict(row, "host-a", 100, 55.0, 30.0, alive=alive) is None
    assert "pid 100 on host-a" in str(
        instance_conflict(row, "host-a", 200, 55.0, 30.0, alive=alive)
    )
    assert instance_conflict(row, "host-b", 100, 55.0, 30.0, alive=alive) is not None
    stopped = Instance("n1", "host-a", 100, started_at=0.0, seen_at=50.0, stopped_at=51.0)
    assert instance_conflict(stopped, "host-b", 100, 55.0, 30.0, alive=alive) is None


def test_a_clean_stop_frees_the_id_and_shows_as_stopped(
    tmp_path: Path, folders: dict[str, Path], db_url: str
) -> None:
    """A clean stop frees the id; ``status`` says "stopped", not "alive", even within the lease."""
    # Releasing at a clean stop records it.
    store = Store(db_url)
    try:
        store.register_instance("node-7", "host-a", 4242, now=9e9)
        store.release("node-7", now=9e9 + 1)
        row = store.instance("node-7")
        assert row is not None
        assert row.stopped_at == 9e9 + 1
        assert instance_conflict(row, "host-b", 1, 9e9 + 2, 30.0) is None
        store.register_instance("node-7", "host-b", 1, now=9e9 + 3)  # started again
        again = store.instance("node-7")
        assert again is not None
        assert again.stopped_at is None
        store.release("node-7", now=9e9 + 4)
    finally:
        store.close()
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9", state_db=db_url)
    payload = json.loads(cli(config, "status", "--no-hub", "--json").stdout)
    assert payload["instances"][0]["stopped"]
    assert not payload["instances"][0]["alive"]
    assert "node-7 (pid 1 on host-b): stopped" in cli(config, "status", "--no-hub").stdout


def test_start_up_sweep_leaves_other_instances_downloads_alone() -> None:
    """Own temporary files go; another instance's only once untouched for an hour."""
    assert reconcile.is_leftover(".a.docx.ldx-part-n1-5", "n1", age=0.0)
    assert not reconcile.is_leftover(".a.docx.ldx-part-n2-5", "n1", age=10.0)
    assert reconcile.is_leftover(".a.docx.ldx-part-n2-5", "n1", age=reconcile.STALE_SECONDS)
    assert not reconcile.is_leftover(".a.docx.ldx-part-5", "n1", age=10.0)
    assert reconcile.is_leftover(".a.docx.ldx-part-5", None, age=0.0)


def test_every_metric_sample_carries_the_instance_label() -> None:
    """With an instance id set, each sample of the page has ``instance_id``."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics.set_instance("node-3")
    try:
        page = metrics.render().decode()
    finally:
        metrics.set_instance(None)
    found = [s for f in text_string_to_metric_families(page) for s in f.samples]
    assert found
    assert all(sample.labels.get("instance_id") == "node-3" for sample in found)


def test_a_failing_call_does_not_take_its_batch_down(db_url: str) -> None:
    """Group commit: a call failing in the database fails alone; calls batched with it commit."""
    # On PostgreSQL such a failure aborts the whole transaction.
    db = Writer(Store(db_url))

    def slow() -> None:  # holds the writer so that the next calls queue up as one batch
        time.sleep(0.3)

    def broken() -> None:
        with db.store.write() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))

    async def calls() -> list[object]:
        first = asyncio.ensure_future(db.call(slow))
        await asyncio.sleep(0.05)
        batch = [
            db.call(enqueue, db.store, new("a.pdf"), "a.docx", 1.0),
            db.call(broken),
            db.call(enqueue, db.store, new("b.pdf"), "b.docx", 1.0),
        ]
        return [await first, *await asyncio.gather(*batch, return_exceptions=True)]

    try:
        results = asyncio.run(calls())
        assert isinstance(results[2], StateUnavailable)
        assert isinstance(results[2].__cause__, DBAPIError)
        assert {job.path for job in Views(db.store).jobs()} == {"a.pdf", "b.pdf"}
    finally:
        db.close()


def test_output_names_are_claimed_one_instance_at_a_time(db_url: str) -> None:
    """Two instances queueing scan.pdf and scan.png of one folder at once get different outputs."""
    # Under intake's lock the second sees the first's claim.
    stores = [Store(db_url), Store(db_url)]
    barrier = threading.Barrier(2)
    candidates = ["scan.docx", "scan.png.docx", "scan.pdf.docx"]

    def queue(store: Store, path: str) -> None:
        barrier.wait()
        with store.batch():
            store.lock_intake()
            taken = store.outputs_taken(candidates, except_path=path)
            name = next(c for c in candidates if c not in taken)
            time.sleep(0.2)  # a slow claim: without the lock the other would pick it too
            enqueue(store, new(path), name, now=1.0)

    threads = [
        threading.Thread(target=queue, args=(store, path))
        for store, path in zip(stores, ["scan.pdf", "scan.png"], strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    outputs = [job.output for job in Views(stores[0]).jobs()]
    for store in stores:
        store.close()
    assert len(outputs) == 2
    assert len(set(outputs)) == 2, outputs
