"""Operator views: the ``status`` screen, job filters, durations and the purge plan.

Pure functions over jobs, heartbeats and check results, with the time passed in; the
command line gathers the inputs (state table, heartbeat file, a call to the hub) and
prints what these return.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from daemon.jobs.model import Instance, Job
from daemon.ops.health import Heartbeat, age_text, verdict
from daemon.ops.usage import PageUse

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")
_GLOB_CHARS = frozenset("*?[")


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``2h``, ``7d`` or ``1w``; ValueError otherwise."""
    match = _DURATION.match(text.lower())
    if match is None or match.group(2) not in ("", *_UNITS):
        raise ValueError(f"not a duration: {text!r} (examples: 90s, 15m, 2h, 7d)")
    return float(match.group(1)) * _UNITS.get(match.group(2), 1)


def path_matches(pattern: str, path: str) -> bool:
    """A glob (``invoices/*.pdf``) matches the whole path; a plain path is a file or folder."""
    if _GLOB_CHARS & set(pattern):
        return fnmatchcase(path, pattern)
    prefix = pattern.strip("/")
    return path == prefix or path.startswith(f"{prefix}/")


def filter_jobs(jobs: Iterable[Job], path: str | None, limit: int | None) -> list[Job]:
    """Jobs whose path matches ``path`` (all when None), at most ``limit`` of them."""
    chosen = [job for job in jobs if path is None or path_matches(path, job.path)]
    return chosen if limit is None else chosen[:limit]


def purge_plan(
    candidates: Iterable[tuple[int, str, bool]], input_present: Callable[[str], bool]
) -> tuple[list[int], list[int]]:
    """(ids to delete, ids kept) among old final jobs.

    The newest job of an input that is still in the inbox is kept: the daemon remembers
    kept inputs by it, and would otherwise convert (and pay for) them again.
    """
    delete: list[int] = []
    kept: list[int] = []
    for job_id, path, newest in candidates:
        (kept if newest and input_present(path) else delete).append(job_id)
    return delete, kept


def when(ts: float | None) -> str:
    """An epoch time as ``YYYY-MM-DD HH:MM UTC``."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class HubCheck:
    """What one authenticated call to the hub showed (None: not checked)."""

    reachable: bool | None
    key_accepted: bool | None
    detail: str

    def text(self) -> str:
        """One line for the status screen."""
        if self.reachable is None:
            return f"not checked: {self.detail}"
        if not self.reachable:
            return f"UNREACHABLE: {self.detail}"
        if not self.key_accepted:
            return f"reachable, API key REJECTED: {self.detail}"
        return "reachable, API key accepted"


@dataclass(frozen=True)
class StatusReport:
    """Everything ``status`` shows, gathered at ``now``."""

    now: float
    counts: dict[str, int]
    oldest_waiting_at: float | None
    failures: Sequence[Job]
    heartbeat: Heartbeat | None
    stall_timeout: float
    hub_url: str
    hub: HubCheck
    hook_failures: Sequence[Job] = ()
    pages: PageUse | None = None

    def daemon(self) -> tuple[bool, list[str]]:
        """Whether the daemon runs and is healthy, and the notes."""
        return verdict(self.heartbeat, self.now, self.stall_timeout)

    def oldest_age(self) -> float | None:
        """Seconds the oldest unfinished job has waited."""
        if self.oldest_waiting_at is None:
            return None
        return max(0.0, self.now - self.oldest_waiting_at)

    def to_json(self, job_json: Callable[[Job], dict[str, Any]]) -> dict[str, Any]:
        """The ``status --json`` object, failures shaped by ``job_json``."""
        running, notes = self.daemon()
        beat = self.heartbeat
        return {
            "counts": self.counts,
            "oldest_waiting_seconds": self.oldest_age(),
            "recent_failures": [job_json(job) for job in self.failures],
            "daemon": {
                "healthy": running,
                "notes": notes,
                "pid": beat.pid if beat else None,
                "paused": beat.paused if beat else None,
                "in_flight": beat.in_flight if beat else None,
            },
            "hook_failures": [
                {"id": job.id, "path": job.path, "hook_error": job.hook_error}
                for job in self.hook_failures
            ],
            "pages": self.pages.to_json() if self.pages is not None else None,
            "hub": {
                "url": self.hub_url,
                "reachable": self.hub.reachable,
                "key_accepted": self.hub.key_accepted,
                "detail": self.hub.detail,
            },
        }


def _daemon_view(report: StatusReport) -> str:
    """What the running daemon says about the hub, when this command could not ask it."""
    beat = report.heartbeat
    if report.hub.reachable is not None or beat is None:
        return ""
    if beat.paused:
        return f"; the daemon reports: work paused, {beat.paused}"
    if beat.holding_back:
        return f"; the daemon reports: holding back, {beat.holding_back}"
    return "; the daemon reports no trouble with the hub"


def render_status(report: StatusReport) -> str:
    """The human ``status`` screen."""
    healthy, notes = report.daemon()
    beat = report.heartbeat
    daemon_line = ("" if healthy else "NOT OK: ") + "; ".join(notes)
    if healthy and beat is not None:
        daemon_line += f"; {beat.in_flight} in flight"
    age = report.oldest_age()
    lines = [
        f"ldx-hotfolder status at {when(report.now)}",
        "",
        f"daemon   {daemon_line}",
        f"hub      {report.hub_url}: {report.hub.text()}{_daemon_view(report)}",
        "jobs     " + "  ".join(f"{name}: {count}" for name, count in report.counts.items()),
        "waiting  "
        + (
            "nothing"
            if age is None
            else f"the oldest unfinished job was queued {age_text(age)} ago"
        ),
    ]
    lines += _page_lines(report)
    if report.failures:
        lines += ["", "recent failures:"]
        for job in report.failures:
            ago = age_text(max(0.0, report.now - (job.finished_at or job.updated_at)))
            lines.append(
                f"  #{job.id} {job.path}: {job.error_message} [{job.error_code}] ({ago} ago)"
            )
    if report.hook_failures:
        lines += ["", "hooks that failed (the conversions are not affected):"]
        lines += [f"  #{job.id} {job.path}: {job.hook_error}" for job in report.hook_failures]
    return "\n".join(lines)


def _page_lines(report: StatusReport) -> list[str]:
    """Pages billed today and this month; the budget's hold unless the daemon says it."""
    pages = report.pages
    if pages is None:
        return []
    lines = [f"pages    {pages.line()}"]
    beat = report.heartbeat
    said = beat is not None and "page budget" in (beat.holding_back or "")
    if pages.held and not said:
        lines.append(f"budget   {pages.held}")
    return lines


def holder(job: Job, now: float) -> str | None:
    """The instance that holds ``job`` now (its lease is current), or None."""
    if job.owner is None or job.lease_until is None or job.lease_until < now:
        return None
    return job.owner


def instances_json(
    instances: Sequence[Instance], held: dict[str, int], now: float, lease: float
) -> list[dict[str, Any]]:
    """The instances sharing the database, for ``status --json``."""
    return [
        {
            "id": item.id,
            "host": item.host,
            "pid": item.pid,
            "alive": item.stopped_at is None and now - item.seen_at <= lease,
            "stopped": item.stopped_at is not None,
            "seen_seconds_ago": round(max(0.0, now - item.seen_at), 1),
            "jobs_held": held.get(item.id, 0),
        }
        for item in instances
    ]


def instance_lines(
    instances: Sequence[Instance], held: dict[str, int], now: float, lease: float
) -> list[str]:
    """The ``status`` lines naming each instance and the jobs it holds."""
    if not instances:
        return []
    lines = ["", "instances:"]
    for item in instances_json(instances, held, now, lease):
        state = "alive" if item["alive"] else "not seen within its lease"
        if item["stopped"]:
            state = "stopped"
        lines.append(
            f"  {item['id']} (pid {item['pid']} on {item['host']}): {state}, seen "
            f"{age_text(item['seen_seconds_ago'])} ago; holds {item['jobs_held']} job(s)"
        )
    return lines
