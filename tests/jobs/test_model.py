"""The job model: legal transitions and where a job resumes from (pure)."""

from __future__ import annotations

import pytest

from daemon.jobs.model import (
    TRANSITIONS,
    IllegalTransition,
    Job,
    RemoteRecord,
    Stage,
    Status,
    check_transition,
    resume_point,
)


def job(**changes: object) -> Job:
    """A failed job of one input (an upload the hub may still hold)."""
    values: dict[str, object] = {
        "id": 1,
        "path": "a.pdf",
        "size": 10,
        "mtime_ns": 1,
        "inode": 1,
        "input_format": "pdf",
        "sha256": "0" * 64,
        "status": Status.FAILED,
        "stage": Stage.FAILED,
        "engine": "ki/ocr",
        "language": "jpn",
        "output_format": "docx",
        "on_success": None,
        "rule": None,
        "hook_error": None,
        "output": "a.docx",
        "remote_file_id": None,
        "remote_job_id": None,
        "output_file_id": None,
        "attempts": 3,
        "submits": 1,
        "rearms": 0,
        "next_attempt_at": None,
        "error_code": "publish_failed",
        "error_message": "m",
        "created_at": 0.0,
        "updated_at": 0.0,
        "finished_at": 0.0,
    }
    values.update(changes)
    return Job(**values)  # type: ignore[arg-type]


def record(status: str, **changes: object) -> RemoteRecord:
    """A remote job of job 1 on upload f1."""
    values: dict[str, object] = {
        "job_id": 1,
        "remote_job_id": "r1",
        "remote_file_id": "f1",
        "created_at": 100.0,
        "status": status,
    }
    values.update(changes)
    return RemoteRecord(**values)  # type: ignore[arg-type]


def test_every_stage_may_stay_and_only_listed_moves_pass() -> None:
    """Staying put is always legal; a move not in the table is refused with a sentence."""
    for stage in Stage:
        check_transition(stage, stage)
    check_transition(Stage.SUBMITTING, Stage.SUBMITTED)
    with pytest.raises(IllegalTransition, match="cannot go from done to pending"):
        check_transition(Stage.DONE, Stage.PENDING)
    with pytest.raises(IllegalTransition, match="from pending"):
        check_transition(Stage.PENDING, Stage.DOWNLOADING)


def test_a_retried_job_may_resume_at_any_point_the_hub_may_still_hold() -> None:
    """A failed job may go back to every stage a retry can resume from, and to no other."""
    resumable = {Stage.PENDING, Stage.UPLOADED, Stage.SUBMITTING, Stage.SUBMITTED}
    resumable |= {Stage.DOWNLOADING, Stage.DOWNLOADED, Stage.PUBLISHED}
    assert resumable <= TRANSITIONS[Stage.FAILED]
    assert Stage.DONE not in TRANSITIONS[Stage.FAILED]


def test_a_kept_output_is_published_without_the_hub() -> None:
    """An output the daemon kept (its folder refused it) is what a retry resumes from."""
    assert (
        resume_point(job(), [record("completed", output_file_id="o1")], 0.0, output_kept=True)[0]
        is Stage.DOWNLOADED
    )


def test_an_unexpired_output_is_downloaded_never_converted_again() -> None:
    """A completed remote job whose output has not expired is fetched again."""
    stage, changes = resume_point(
        job(remote_file_id="f1"),
        [record("failed"), record("completed", remote_job_id="r2", output_file_id="o2")],
        now=1000.0,
    )
    assert stage is Stage.DOWNLOADING
    assert changes["output_file_id"] == "o2"
    assert changes["remote_job_id"] == "r2"


def test_an_expired_output_and_a_live_upload_convert_again_from_the_upload() -> None:
    """Once the output expired, a new conversion starts from the upload the hub keeps."""
    expired = record("completed", output_file_id="o1", expires_at=500.0)
    stage, changes = resume_point(
        job(remote_file_id="f1", upload_expires_at=5000.0), [expired], now=1000.0
    )
    assert stage is Stage.UPLOADED
    assert changes["output_file_id"] is None


def test_a_running_remote_job_is_followed_not_created_again() -> None:
    """A remote job still queued or processing at the hub is waited for."""
    stage, changes = resume_point(job(remote_file_id="f1"), [record("processing")], 0.0)
    assert (stage, changes["remote_job_id"]) == (Stage.SUBMITTED, "r1")


def test_with_nothing_left_at_the_hub_the_input_is_uploaded_again() -> None:
    """No output, no live upload: start from the input (uploads are not billed)."""
    stage, changes = resume_point(
        job(remote_file_id="f1", upload_expires_at=10.0), [record("failed")], now=1000.0
    )
    assert (stage, changes["remote_file_id"]) == (Stage.PENDING, None)
