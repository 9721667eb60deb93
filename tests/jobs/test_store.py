"""State store: rows, stages, statuses and the durability settings of SQLite."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.dialects import sqlite as sqlite_dialect

from daemon.cli import main
from daemon.jobs.model import NewJob, RemoteRecord, Stage, Status, status_of
from daemon.jobs.store import _CONVERTED_BEFORE, Store
from daemon.jobs.views import Views
from tests.conftest import daemon_config
from tests.helpers import enqueue, reject


def new(path: str = "a/scan.pdf", size: int = 10, mtime_ns: int = 1) -> NewJob:
    return NewJob(path, size, mtime_ns, 7, "pdf", "ki/ocr", "jpn", "docx")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def test_sqlite_runs_in_wal_with_full_sync(store: Store, tmp_path: Path) -> None:
    """The database is in WAL mode and commits with synchronous=FULL."""
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    assert store.integrity_ok()


def test_enqueue_then_advance_through_stages(store: Store) -> None:
    """Stages map to the four public statuses, and ids are kept."""
    job = enqueue(store, new(), "a/scan.docx", now=1.0)
    assert (job.status, job.stage) == (Status.QUEUED, Stage.PENDING)
    job = store.advance(job.id, Stage.UPLOADED, 2.0, remote_file_id="f" * 32)
    assert job.status is Status.PROCESSING
    assert job.remote_file_id == "f" * 32
    job = store.advance(job.id, Stage.DONE, 3.0)
    assert job.status is Status.COMPLETED
    assert job.finished_at == 3.0
    assert Views(store).counts() == {"queued": 0, "processing": 0, "completed": 1, "failed": 0}


def test_status_of_every_stage() -> None:
    """Only pending is queued; published and done are completed."""
    assert status_of(Stage.PENDING) is Status.QUEUED
    assert status_of(Stage.SUBMITTED) is Status.PROCESSING
    assert status_of(Stage.PUBLISHED) is Status.COMPLETED
    assert status_of(Stage.FAILED) is Status.FAILED


def test_advance_rejects_unknown_fields(store: Store) -> None:
    """A typo in a field name fails loudly instead of being dropped."""
    job = enqueue(store, new(), "a/scan.docx", now=1.0)
    with pytest.raises(ValueError, match="remote_jb_id"):
        store.advance(job.id, Stage.UPLOADED, 2.0, remote_jb_id="x")


def test_claim_respects_due_time_and_exclusions(store: Store) -> None:
    """Deferred jobs wait for next_attempt_at; running jobs are excluded."""
    a = enqueue(store, new("a.pdf"), "a.docx", 1.0)
    b = enqueue(store, new("b.pdf"), "b.docx", 1.0)
    store.advance(b.id, Stage.PENDING, 1.0, next_attempt_at=50.0)

    def due(now: float, running: list[int]) -> list[int]:
        return [c.job.id for c in store.claim(now, 10, running, "me", lease=30.0)]

    assert due(10.0, []) == [a.id]
    assert due(10.0, [a.id]) == []
    assert due(60.0, []) == [a.id, b.id]
    assert store.next_due() == 50.0


def test_fingerprints_are_latest_per_path(store: Store) -> None:
    """Intake knows the newest version of each path."""
    enqueue(store, new("a.pdf", size=1, mtime_ns=1), "a.docx", 1.0)
    enqueue(store, new("a.pdf", size=2, mtime_ns=2), "a.docx", 2.0)
    reject(store, new("b.txt"), "b.docx", "unsupported_type", "no", 3.0)
    versions = {path: version[:2] for path, version in store.versions().items()}
    assert versions == {"a.pdf": (2, 2), "b.txt": (10, 1)}


def test_outputs_taken_ignores_same_path(store: Store) -> None:
    """A claim by another input blocks a name; one's own earlier claim does not."""
    enqueue(store, new("scan.pdf"), "scan.docx", 1.0)
    assert store.outputs_taken(["scan.docx", "scan.png.docx"], "scan.png") == {"scan.docx"}
    assert store.outputs_taken(["scan.docx"], "scan.pdf") == set()


def test_name_claims_in_one_lookup(store: Store) -> None:
    """One lookup gives each path's newest version, its own names and others' claims."""
    enqueue(store, new("scan.pdf", size=1, mtime_ns=1), "scan.docx", 1.0)
    enqueue(store, new("scan.pdf", size=2, mtime_ns=2), "scan (2).docx", 2.0)
    enqueue(store, new("scan.png"), "scan.png.docx", 3.0)
    enqueue(store, new("other.pdf"), "other.docx", 4.0)
    known, unknown = store.name_claims(
        [("scan.pdf", ["scan.docx", "scan.png.docx", "x.docx"]), ("new.pdf", ["scan.docx"])]
    )
    assert known.latest == (2, 2, new("scan.pdf").inode)
    assert known.mine == {"scan.docx", "scan (2).docx"}
    assert known.taken == {"scan.png.docx"}
    assert (unknown.latest, unknown.mine, unknown.taken) == (None, set(), {"scan.docx"})
    assert store.name_claims([]) == []


def test_add_jobs_inserts_a_batch_in_one_statement(store: Store) -> None:
    """A batch inserts queued and refused jobs together and leaves out a known version."""
    enqueue(store, new("known.pdf"), "known.docx", 1.0)
    entries = [
        (new("known.pdf"), "known.docx", None),
        (new("a.pdf"), "a.docx", None),
        (new("bad.pdf"), "bad.docx", ("not_a_scan", "not a PDF")),
    ]
    added = store.add_jobs(entries, 2.0)
    assert set(added) == {"a.pdf", "bad.pdf"}
    assert (added["a.pdf"].status, added["a.pdf"].output) == (Status.QUEUED, "a.docx")
    bad = added["bad.pdf"]
    assert (bad.status, bad.error_code, bad.finished_at) == (Status.FAILED, "not_a_scan", 2.0)
    assert len(Views(store).jobs()) == 3
    assert store.add_jobs([], 3.0) == {}


def test_requeue_only_failed_and_resumes_from_what_the_hub_holds(store: Store) -> None:
    """retry re-arms failed jobs from their upload while it is alive, and from the start
    once it expired; other jobs are left alone."""
    ok = enqueue(store, new("ok.pdf"), "ok.docx", 1.0)
    bad = enqueue(store, new("bad.pdf"), "bad.docx", 1.0)
    store.advance(bad.id, Stage.FAILED, 2.0, remote_file_id="x", error_code="e", error_message="m")
    again = store.requeue([ok.id, bad.id], 3.0)
    assert [j.id for j in again] == [bad.id]
    assert (again[0].stage, again[0].remote_file_id) == (Stage.UPLOADED, "x")
    assert again[0].error_code is None
    store.advance(bad.id, Stage.FAILED, 4.0, upload_expires_at=5.0, error_code="e")
    (expired,) = store.requeue([bad.id], 3600.0)
    assert (expired.stage, expired.remote_file_id) == (Stage.PENDING, None)


def test_record_remote_is_one_row_per_remote_job_keeping_its_creation_time(db_url: str) -> None:
    """record_remote inserts a remote job, then updates that row; a later record without
    the hub's creation time keeps the one noted at creation (SQLite and PostgreSQL)."""
    store = Store(db_url)
    try:
        job = enqueue(store, new(), "a/scan.docx", 1.0)
        store.record_remote(RemoteRecord(job.id, "r1", "f1", 100.0, "queued"), 2.0)
        done = RemoteRecord(job.id, "r1", "f1", None, "completed", "out", 900.0, 3)
        store.record_remote(done, 3.0)
        store.record_remote(RemoteRecord(job.id, "r2", "f1", None, "lost"), 4.0)
        assert store.remote_records(job.id) == [
            RemoteRecord(job.id, "r1", "f1", 100.0, "completed", "out", 900.0, 3),
            RemoteRecord(job.id, "r2", "f1", None, "lost"),
        ]
    finally:
        store.close()


def test_record_usage_notes_a_remote_job_once(db_url: str) -> None:
    """record_usage notes what the hub billed for a remote job once: a second note of it
    (another outcome, other pages) changes nothing and says so (SQLite and PostgreSQL)."""
    store = Store(db_url)
    try:
        job = enqueue(store, new(), "a/scan.docx", 1.0)
        billed = RemoteRecord(job.id, "r1", "f1", None, "completed", pages=3)
        assert store.record_usage(job, billed, "a", 5.0)
        again = RemoteRecord(job.id, "r1", "f1", None, "failed", pages=9)
        assert not store.record_usage(job, again, "a", 6.0)
        unbilled = RemoteRecord(job.id, "r2", "f1", None, "failed")
        assert not store.record_usage(job, unbilled, "a", 6.0)
        billed_rows = Views(store).billed(0.0, 10.0)
        assert [(b.pages, b.outcome, b.billed_at) for b in billed_rows] == [(3, "completed", 5.0)]
    finally:
        store.close()


def test_writes_wait_for_another_writer(store: Store, tmp_path: Path) -> None:
    """A write that meets another process's write lock waits instead of failing."""
    other = sqlite3.connect(
        tmp_path / "state.db", timeout=5, isolation_level=None, check_same_thread=False
    )
    other.execute("BEGIN IMMEDIATE")

    releaser = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    releaser.start()
    job = enqueue(store, new(), "a/scan.docx", 1.0)  # blocks until the other commits
    releaser.join()
    other.close()
    assert job.id == 1


def test_duplicate_lookup_searches_by_hash_not_by_status(store: Store) -> None:
    """SQLite finds earlier conversions through the sha256 index, not by scanning completed rows."""
    # Scanning every completed row made each upload's lookup grow with the table.
    compiled = _CONVERTED_BEFORE.compile(dialect=sqlite_dialect.dialect())
    params = compiled.construct_params(
        {"sha256": "a" * 64, "engine": "ki/ocr", "language": "jpn"}
        | {"output_format": "docx", "exclude_id": 1}
    )
    values = [params[name] for name in compiled.positiontup or ()]
    with store.engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", tuple(values)).all()
    outer = plan[0][3]
    assert "ix_jobs_sha256" in outer, plan


def damaged_state(folders: dict[str, Path], *, header: bool) -> Path:
    """A state database of 3,000 rows, its header or three of its pages overwritten."""
    db = folders["state"] / "state.db"
    store = Store(f"sqlite:///{db}", upgrade=True)
    with store.batch():
        for i in range(3000):
            new = NewJob(f"a/{i:05d}-{'x' * 80}.pdf", 100, i, i, "pdf", "ki/ocr", "jpn", "docx")
            enqueue(store, new, f"a/{i}.docx", 1.0)
    store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    spans = [(0, 100)] if header else [(4096 * n + 100, 4096 * n + 3000) for n in (5, 40, 80)]
    for start, end in spans:
        data[start:end] = b"\xa5" * (end - start)
    db.write_bytes(bytes(data))
    return db


@pytest.mark.parametrize(
    ("header", "detail"),
    [(True, "file is not a database"), (False, "it fails its integrity check")],
    ids=["not-a-database", "damaged-pages"],
)
def test_a_damaged_state_database_stops_with_what_to_do(
    tmp_path: Path,
    folders: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    header: bool,
    detail: str,
) -> None:
    """A damaged state file exits 2 naming it, how to recover, and why not to delete it."""
    db = damaged_state(folders, header=header)
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9")
    capsys.readouterr()
    assert main(["once", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"the state database {db} is damaged ({detail})" in err
    assert f"sqlite3 {db} .recover" in err
    assert "(and pay for) every input still in the inbox again" in err
    assert "Traceback" not in err
