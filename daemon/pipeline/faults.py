"""The fault policy: what a step's exception means for its job (pure, time passed in).

``decide`` maps an exception and the job it stopped to one ``Decision``:

- ``Retry``: do the step again after a delay. Network errors, timeouts, 5xx and 429
  never fail a job, however long they last (the hub gate holds the work meanwhile);
  other transient causes (an unreadable answer, an invalid download, a local I/O
  error) count as attempts and fail the job once ``max_attempts`` are used.
- ``Fail``: the input's own problem, or a permanent local one: fail with the reason.
- ``Withdraw``: the input changed or vanished before anything was paid: drop the job,
  intake takes the file again once it is stable.
- ``Requeue``: the hub failed the job for a cause worth a new conversion.
- ``Hold``: not the job's fault and nothing to count (a full disk, a rejected key or a
  refused plan): look again soon.
- ``LetGo``: another instance took the job over.

The delays follow capped exponential backoff with full jitter, with the server's
``Retry-After`` as a floor (``retry_delay``).
"""

from __future__ import annotations

import dataclasses
import errno
import random
from dataclasses import dataclass

from daemon.advice import os_error_text
from daemon.errors import (
    HubBusy,
    HubUnavailable,
    InputChanged,
    JobFailed,
    LeaseLost,
    NotYet,
    OperatorAction,
    Requeue,
    RetryLater,
    StateUnavailable,
)
from daemon.jobs.model import Job, Stage
from daemon.logs import plain

BASE_SECONDS = 1.0
CAP_SECONDS = 300.0
HOLD_SECONDS = 5.0  # a job held for a cause outside it is looked at again this soon
PASSING_STEP = 3  # a passing cause waits like a third retry: up to 4 s, or its Retry-After
# A Retry-After is honoured up to an hour: a longer one (a broken proxy, "inf") would
# leave a job waiting for days while it looks merely slow.
RETRY_AFTER_CAP_SECONDS = 3600.0
# Transient causes that never count as attempts: they pass by themselves, and the gate
# holds hub work while the hub is down.
PASSING_CODES = frozenset(
    {"network", "timeout", "deadline", "rate_limited", "hub_unavailable", "not_yet", "state_db"}
)
# Hub-side failures that may well succeed when converted again (the hub already retried).
TRANSIENT_REMOTE_CODES = frozenset({"upstream_service_error", "internal_error", "timeout"})
# Failures whose jobs an automatic re-arm tries again after a cool-down: causes that may
# pass by themselves. A re-arm resumes from what the hub still holds and never pays past
# ``max_conversions``, so the hub's own failures (already paid twice) are not among them.
REARM_CODES = frozenset(
    {
        "bad_response",
        "bad_output",
        "short_download",
        "too_slow",
        "local_io",
        "publish_failed",
        "internal",
    }
)


def retry_delay(
    attempt: int,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    base: float = BASE_SECONDS,
    cap: float = CAP_SECONDS,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
    ceiling = min(cap, base * 2 ** max(min(attempt, 60) - 1, 0))
    jittered = (rng or random).uniform(0.0, ceiling)
    if retry_after is not None:
        return max(jittered, min(retry_after, RETRY_AFTER_CAP_SECONDS))
    return jittered


@dataclass(frozen=True)
class Retry:
    """Do the step again after ``delay`` seconds; ``counts``: it uses up an attempt (the
    job fails once they are used); ``grows``: the next delay is longer (never fails)."""

    delay: float
    code: str
    message: str
    counts: bool
    grows: bool = False


@dataclass(frozen=True)
class Fail:
    """Fail the job with this reason."""

    code: str
    message: str


@dataclass(frozen=True)
class Withdraw:
    """Drop the job: its input changed before anything was paid for."""

    message: str


@dataclass(frozen=True)
class Hold:
    """Look again after ``delay``; not the job's fault, nothing counted."""

    delay: float
    code: str
    message: str


@dataclass(frozen=True)
class LetGo:
    """Another instance holds the job now."""


@dataclass(frozen=True)
class Send:
    """Send the job back to ``stage`` after ``delay`` (the hub failed it transiently)."""

    stage: Stage
    delay: float
    code: str
    message: str


Decision = Retry | Fail | Withdraw | Hold | LetGo | Send


def passes_by_itself(exc: RetryLater) -> bool:
    """Whether a transient cause must never fail a job (network, 5xx, 429, waiting)."""
    if isinstance(exc, HubBusy | NotYet | StateUnavailable):
        return True
    if isinstance(exc, HubUnavailable):
        return exc.code in PASSING_CODES or exc.code.startswith("http_")
    return exc.code in PASSING_CODES


def decide(
    exc: BaseException, job: Job, *, max_attempts: int, rng: random.Random | None = None
) -> Decision:
    """What ``exc``, raised by a step of ``job``, means for the job."""
    signal = _signal(exc)
    if signal is not None:
        return signal
    if isinstance(exc, InputChanged):
        return Withdraw(exc.message)
    if isinstance(exc, JobFailed):
        return Fail(exc.code, exc.message)
    if isinstance(exc, OperatorAction):
        return Hold(HOLD_SECONDS, exc.code, exc.message)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f": {exc.filename}" if exc.filename else ""
        return Hold(HOLD_SECONDS, "disk_full", f"no space left on the disk{where}")
    if not isinstance(exc, RetryLater):
        exc = _as_transient(exc)
    return _retry(exc, job, max_attempts, rng)


def _signal(exc: BaseException) -> Decision | None:
    """The decision a control-flow signal asks for, or None for an error."""
    if isinstance(exc, LeaseLost):
        return LetGo()
    if isinstance(exc, Requeue):
        return Send(Stage(exc.stage), exc.delay, exc.code, exc.message)
    return None


def _as_transient(exc: BaseException) -> RetryLater:
    if isinstance(exc, OSError):
        return RetryLater(f"local file error: {os_error_text(exc)}", code="local_io")
    return RetryLater(f"internal error: {type(exc).__name__}: {exc}", code="internal")


def _retry(exc: RetryLater, job: Job, max_attempts: int, rng: random.Random | None) -> Decision:
    if isinstance(exc, NotYet):
        # The hub will have it (an output before its expiry): wait longer each time, up to
        # the cap, and never fail for it; the step decides when "not yet" becomes "never".
        delay = retry_delay(job.attempts + 1, retry_after=exc.retry_after, rng=rng)
        return Retry(delay, exc.code, exc.message, counts=False, grows=True)
    if passes_by_itself(exc):
        # No growth: the gate holds hub work while the hub is down, the budget slows
        # every request after a 429, and both let work go on the moment they open.
        delay = retry_delay(PASSING_STEP, retry_after=exc.retry_after, rng=rng)
        return Retry(delay, exc.code, exc.message, counts=False)
    attempt = job.attempts + 1
    if attempt > max_attempts:
        return Fail(exc.code, f"{exc.message} (gave up after {job.attempts} retries)")
    delay = retry_delay(attempt, retry_after=exc.retry_after, rng=rng)
    return Retry(delay, exc.code, exc.message, counts=True)


MAX_MESSAGE = 1000  # characters of a reason kept in the table, an error file or a hook


def cleaned(decision: Decision) -> Decision:
    """``decision`` with its reason made safe to store and show (``logs.plain``): every
    reason, whatever raised it, reaches the table, error files, hooks and terminals."""
    if isinstance(decision, LetGo):
        return decision
    return dataclasses.replace(decision, message=plain(decision.message, MAX_MESSAGE))
