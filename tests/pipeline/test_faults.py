"""The fault policy: what each exception means for its job (pure)."""

from __future__ import annotations

import errno
import random

from daemon.errors import (
    AuthRejected,
    HubBusy,
    HubRefused,
    HubUnavailable,
    InputChanged,
    JobFailed,
    LeaseLost,
    NotYet,
    Requeue,
    RetryLater,
    StateUnavailable,
)
from daemon.jobs.model import Stage
from daemon.pipeline import faults
from tests.jobs.test_model import job

RNG = random.Random(4)


def decide(exc: BaseException, attempts: int = 0, max_attempts: int = 3) -> faults.Decision:
    """The decision for ``exc`` raised by a job that used ``attempts`` already."""
    return faults.decide(exc, job(attempts=attempts), max_attempts=max_attempts, rng=RNG)


def test_network_5xx_429_and_waiting_never_fail_a_job_however_often() -> None:
    """Transient hub causes are retried without counting, whatever the attempts used."""
    for exc in (
        HubUnavailable("down", code="network"),
        HubUnavailable("502", code="http_502", maybe_done=True),
        HubUnavailable("slow", code="deadline"),
        HubBusy("429", code="rate_limited", retry_after=7.0),
        NotYet("not stored yet"),
        StateUnavailable("disk full under the database"),
    ):
        decision = decide(exc, attempts=1000)
        assert isinstance(decision, faults.Retry), exc
        assert decision.counts is False
        assert decision.delay <= 60.0 or decision.delay == exc.retry_after


def test_retry_after_is_a_floor_for_the_delay() -> None:
    """A 429's Retry-After is waited at least."""
    decision = decide(HubBusy("429", code="rate_limited", retry_after=30.0))
    assert isinstance(decision, faults.Retry)
    assert decision.delay >= 30.0


def test_other_transient_causes_count_and_fail_after_max_attempts() -> None:
    """An invalid download is retried while attempts remain, then fails with the reason."""
    bad = RetryLater("the downloaded output is not a valid docx", code="bad_output")
    retry = decide(bad, attempts=2)
    assert isinstance(retry, faults.Retry)
    assert retry.counts
    failed = decide(bad, attempts=3)
    assert isinstance(failed, faults.Fail)
    assert failed.code == "bad_output"
    assert "gave up after 3 retries" in failed.message


def test_an_input_problem_fails_at_once() -> None:
    """The hub's refusal of the input fails the job with the hub's reason."""
    decision = decide(JobFailed("unsupported format", code="unsupported_format"))
    assert decision == faults.Fail("unsupported_format", "unsupported format")


def test_a_changed_input_is_withdrawn_not_failed() -> None:
    """A version that changed before anything was paid is withdrawn (intake takes it again)."""
    assert isinstance(decide(InputChanged("changed")), faults.Withdraw)


def test_operator_causes_and_a_full_disk_hold_without_counting() -> None:
    """A rejected key, a refused plan and a full disk hold the job; nothing is counted."""
    full = OSError(errno.ENOSPC, "No space left on device", "/out/a.docx")
    for exc, code in (
        (AuthRejected("bad key"), "auth_rejected"),
        (HubRefused("no RenderOCR in the plan", route="POST /renderocr/jobs"), "hub_refused"),
        (full, "disk_full"),
    ):
        decision = decide(exc, attempts=99)
        assert isinstance(decision, faults.Hold), exc
        assert decision.code == code


def test_signals_let_go_or_send_back() -> None:
    """A lost lease lets go; a requeue sends the job back to its stage after the delay."""
    assert isinstance(decide(LeaseLost("taken over")), faults.LetGo)
    send = decide(Requeue(Stage.UPLOADED, 20.0, "upstream_service_error", "try later"))
    assert send == faults.Send(Stage.UPLOADED, 20.0, "upstream_service_error", "try later")


def test_unexpected_errors_are_retried_as_internal_then_fail() -> None:
    """A bug in a step is retried a few times (logged), then fails, never crashes the worker."""
    decision = decide(KeyError("x"))
    assert isinstance(decision, faults.Retry)
    assert decision.code == "internal"
    assert isinstance(decide(OSError(errno.EIO, "I/O error"), attempts=3), faults.Fail)


def test_backoff_is_capped_and_jittered() -> None:
    """Delays grow with the attempt, never past the cap, and vary between retries."""
    delays = [faults.retry_delay(50, rng=RNG) for _ in range(50)]
    assert max(delays) <= faults.CAP_SECONDS
    assert len(set(delays)) > 40
    assert all(faults.retry_delay(1, rng=RNG) <= faults.BASE_SECONDS for _ in range(20))
