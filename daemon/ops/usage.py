"""Usage: the pages the hub billed, per folder, rule, day or month (``ldx-hotfolder usage``).

Pure functions with the time passed in: the calendar periods (UTC days and months, which
the page budget counts in too), the period a command line asks for, the grouping of
billed conversions by key, and their JSON, CSV and text forms. The command line reads
the billed rows (``Views.billed``) and prints what these return.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.jobs.views import Billed

GROUPINGS = ("folder", "rule", "day", "month")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TOP = "(inbox)"  # how the text form names files right in the inbox (key "")


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def day_bounds(now: float) -> tuple[float, float]:
    """The UTC day around ``now``: (its start, the next day's start)."""
    start = _utc(now).replace(hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp(), (start + timedelta(days=1)).timestamp()


def month_bounds(now: float) -> tuple[float, float]:
    """The UTC calendar month around ``now``: (its start, the next month's start)."""
    start = _utc(now).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp(), _next_month(start).timestamp()


def _next_month(start: datetime) -> datetime:
    return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)


def iso(ts: float) -> str:
    """An epoch time as ISO-8601 UTC (``2025-03-01T00:00:00Z``)."""
    return _utc(ts).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Period:
    """From ``start`` (included) to ``end`` (excluded), epoch seconds."""

    start: float
    end: float

    def to_json(self) -> dict[str, str]:
        """The ``period`` object of ``usage --json``."""
        return {"from": iso(self.start), "to": iso(self.end)}


def parse_period(
    now: float, month: str | None = None, since: str | None = None, until: str | None = None
) -> Period:
    """The period ``usage`` reports: a ``YYYY-MM`` month, ``since`` a date or time up to
    ``until`` (a date counts whole; default now), or else the current month; ValueError
    with the reason when the words do not make one."""
    if month is not None:
        if since is not None or until is not None:
            raise ValueError("--month cannot be combined with --since or --until")
        return _month(month)
    if since is None:
        if until is not None:
            raise ValueError("--until needs --since")
        return Period(*month_bounds(now))
    start = _instant(since, "--since")
    end = _instant(until, "--until", whole_day=True) if until is not None else now
    if end <= start:
        raise ValueError(f"the period is empty: {until or iso(now)} is not after {since}")
    return Period(start, end)


def _month(text: str) -> Period:
    match = _MONTH.match(text.strip())
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise ValueError(f"not a month: {text!r} (example: 2025-03)")
    start = datetime(int(match.group(1)), int(match.group(2)), 1, tzinfo=UTC)
    return Period(start.timestamp(), _next_month(start).timestamp())


def _instant(text: str, option: str, *, whole_day: bool = False) -> float:
    """A date (its start, or with ``whole_day`` its end) or a time; UTC unless it says."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{option}: not a date or time: {text!r} (examples: 2025-03-01, 2025-03-01T08:00Z)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if whole_day and _DATE_ONLY.match(text.strip()):
        parsed += timedelta(days=1)
    return parsed.timestamp()


def key_of(row: Billed, by: str, depth: int = 1) -> str:
    """The key ``row`` counts under: its folder ``depth`` levels below the inbox ("" for
    files right in it), its rule, its UTC day (``2025-03-01``) or month (``2025-03``)."""
    if by == "folder":
        return "/".join(row.path.split("/")[:-1][:depth])
    if by == "rule":
        return row.rule or "defaults"
    if by == "day":
        return _utc(row.billed_at).strftime("%Y-%m-%d")
    if by == "month":
        return _utc(row.billed_at).strftime("%Y-%m")
    raise ValueError(f"cannot group by {by!r} (choose one of {', '.join(GROUPINGS)})")


@dataclass(frozen=True)
class UsageRow:
    """Conversions billed under one key, and their pages."""

    key: str
    files: int
    pages: int


@dataclass(frozen=True)
class Usage:
    """What ``usage`` reports: a period, a grouping, the totals and a row per key."""

    period: Period
    by: str
    files: int
    pages: int
    rows: tuple[UsageRow, ...]

    def to_json(self) -> dict[str, Any]:
        """The ``usage --json`` object."""
        return {
            "period": self.period.to_json(),
            "files": self.files,
            "pages": self.pages,
            "rows": [{"key": r.key, "files": r.files, "pages": r.pages} for r in self.rows],
        }


def summarize(
    billed: Iterable[Billed], period: Period, by: str = "folder", depth: int = 1
) -> Usage:
    """Group the billed conversions of ``period`` by key (sorted by key)."""
    if depth < 1:
        raise ValueError("--depth must be 1 or more")
    totals: dict[str, list[int]] = {}
    for row in billed:
        if period.start <= row.billed_at < period.end:
            counted = totals.setdefault(key_of(row, by, depth), [0, 0])
            counted[0] += 1
            counted[1] += row.pages
    rows = tuple(UsageRow(key, files, pages) for key, (files, pages) in sorted(totals.items()))
    files, pages = sum(r.files for r in rows), sum(r.pages for r in rows)
    return Usage(period, by, files, pages, rows)


def to_csv(usage: Usage) -> str:
    """One line per key under a header naming the grouping: ``folder,files,pages``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([usage.by, "files", "pages"])
    writer.writerows([row.key, row.files, row.pages] for row in usage.rows)
    return out.getvalue()


def render(usage: Usage) -> str:
    """The human table: a line per key and the total."""
    start, end = _utc(usage.period.start), _utc(usage.period.end)
    lines = [
        f"pages billed from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC, by {usage.by}",
        "",
    ]
    shown = [(row.key or TOP, str(row.files), str(row.pages)) for row in usage.rows]
    shown.append(("total", str(usage.files), str(usage.pages)))
    width = max(len(usage.by), *(len(key) for key, _, _ in shown))
    lines.append(f"{usage.by:<{width}}  {'files':>7}  {'pages':>9}")
    lines += [f"{key:<{width}}  {files:>7}  {pages:>9}" for key, files, pages in shown]
    return "\n".join(lines)


@dataclass(frozen=True)
class PageUse:
    """Pages billed today and this month against the budget, for ``status``."""

    today: int
    month: int
    per_day: int | None = None
    per_month: int | None = None
    held: str | None = None  # the budget's sentence when it holds new conversions

    def to_json(self) -> dict[str, Any]:
        """The ``pages`` object of ``status --json``."""
        return {
            "today": self.today,
            "this_month": self.month,
            "pages_per_day": self.per_day,
            "pages_per_month": self.per_month,
            "held": self.held,
        }

    def line(self) -> str:
        """One line: ``12 today (of 100), 340 this month (of 2000)``."""

        def of(limit: int | None) -> str:
            return f" (of {limit})" if limit is not None else ""

        return f"{self.today} today{of(self.per_day)}, {self.month} this month{of(self.per_month)}"
