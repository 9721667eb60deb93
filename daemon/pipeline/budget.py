"""The page budget: ``[budget]`` pages a day and a month (UTC days and months).

Before a conversion is paid for, ``Steps.submit`` asks ``PageBudget.admit``: when its
pages (counted at intake, 1 when unknown) would take the pages used today or this month
past a limit, it raises ``BudgetReached``, which the fault policy turns into a hold:
nothing fails, nothing is counted. From then on the worker's brake (``holding``) claims
no job whose next step would pay for a new conversion, until the day or month turns
(``lifts_in`` wakes it then); conversions already at the hub run to their end.

Pages used are those billed in the period plus those of the conversions at the hub not
billed yet (reserved when admitted), so that jobs in flight together cannot pass a
limit between them. The sums are read from the state database at start, when a period
turns and every ``REFRESH_SECONDS`` (other instances sharing it bill too), and kept up
to date in memory meanwhile (``settle``, when the hub reports what it billed).

``decide`` is the decision, pure, with the time passed in.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from daemon.errors import BudgetReached
from daemon.jobs.views import PagesUsed
from daemon.logs import get_logger
from daemon.ops import metrics
from daemon.ops.usage import day_bounds, month_bounds

log = get_logger(component="budget")
WARN_SHARE = 0.8  # the log warns once a period when this share of a limit is billed
REFRESH_SECONDS = 60.0  # the sums are read again from the database this often
RESERVATION_SECONDS = 300.0  # a reservation the database does not show is kept this long
LIFT_RECHECK_SECONDS = 300.0  # a held worker looks at the clock at least this often

Period = Literal["day", "month"]
Loader = Callable[[float, float, float], Awaitable[PagesUsed]]
Bounds = Callable[[float], tuple[float, float]]


@dataclass(frozen=True)
class PageLimits:
    """Pages a UTC day and a UTC month may bill (None: no limit)."""

    per_day: int | None = None
    per_month: int | None = None

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return self.per_day is not None or self.per_month is not None


@dataclass(frozen=True)
class Used:
    """Pages used today and this month (billed, and at the hub)."""

    today: int
    month: int


@dataclass(frozen=True)
class Hold:
    """Why the next conversion waits: ``pages`` more would pass ``limit`` of ``period``."""

    period: Period
    used: int
    limit: int
    pages: int
    resumes: float  # when the period turns (epoch seconds)
    too_big: bool = False  # the conversion alone passes the limit: it waits for a raise

    def sentence(self) -> str:
        """What ``status``, ``explain``, ``health`` and the log say."""
        if self.too_big:
            return (
                f"page budget: this file has {self.pages} pages, more than "
                f"pages_per_{self.period} = {self.limit} allows; it waits until the budget "
                "is raised"
            )
        when = "today" if self.period == "day" else "this month"
        day = datetime.fromtimestamp(self.resumes, UTC).strftime("%Y-%m-%d")
        return f"page budget reached: {self.used} of {self.limit} {when}; resumes on {day}"


def decide(used: Used, pages: int, limits: PageLimits, now: float) -> Hold | None:
    """Whether a conversion of ``pages`` pages must wait (a hold), or may go (None)."""
    checks: tuple[tuple[Period, int | None, int, Bounds], ...] = (
        ("month", limits.per_month, used.month, month_bounds),
        ("day", limits.per_day, used.today, day_bounds),
    )
    for period, limit, count, bounds in checks:
        if limit is not None and count + pages > limit:
            _, end = bounds(now)
            return Hold(period, count, limit, pages, end, too_big=pages > limit)
    return None


def reached(used: Used, limits: PageLimits) -> bool:
    """Whether not one page is left today or this month."""
    return (limits.per_day is not None and used.today >= limits.per_day) or (
        limits.per_month is not None and used.month >= limits.per_month
    )


def nearly_spent(billed: int, limit: int | None) -> bool:
    """Whether ``billed`` pages are at least ``WARN_SHARE`` of ``limit``."""
    return limit is not None and billed >= WARN_SHARE * limit


def period_keys(now: float) -> tuple[str, str]:
    """The UTC day and month of ``now`` (``2025-03-10``, ``2025-03``)."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m")


async def _nothing_used(day_start: float, month_start: float, until: float) -> PagesUsed:
    return PagesUsed(0, 0, {})


class PageBudget:
    """Admits conversions against ``[budget]`` and says while it holds new ones."""

    def __init__(
        self,
        limits: PageLimits,
        load: Loader = _nothing_used,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.limits = limits
        self.load = load
        self.clock = clock
        self.on_change = on_change  # the hold lifted before its period turned: wake up
        self._keys: tuple[str, str] | None = None  # the day and month the sums are of
        self._today = 0
        self._month = 0
        self._reserved: dict[int, tuple[int, float]] = {}  # job id -> (pages, since)
        self._hold: Hold | None = None  # set when a conversion would pass a limit
        self._loaded_at: float | None = None
        self._warned: set[str] = set()
        self._too_big_said: set[int] = set()
        self._lock = asyncio.Lock()
        metrics.set_budget_limits(limits.per_day, limits.per_month)

    @property
    def enabled(self) -> bool:
        """Whether a limit is set (else every call returns at once)."""
        return self.limits.enabled

    def used(self) -> Used:
        """Pages used in the current day and month: billed, and reserved at the hub."""
        self._roll(self.clock())
        reserved = sum(pages for pages, _ in self._reserved.values())
        return Used(self._today + reserved, self._month + reserved)

    # -- the worker's brake ------------------------------------------------------------

    def holding(self) -> str | None:
        """The sentence while new conversions wait for the budget, else None."""
        hold = self._current()
        return hold.sentence() if hold is not None else None

    def lifts_in(self) -> float | None:
        """Seconds until the hold lifts by itself (its period turns), else None."""
        hold = self._current()
        if hold is None:
            return None
        return min(LIFT_RECHECK_SECONDS, max(0.05, hold.resumes - self.clock()))

    def _current(self) -> Hold | None:
        if not self.enabled:
            return None
        now = self.clock()
        self._roll(now)
        if self._hold is not None:
            return self._hold
        used = self.used()
        return decide(used, 1, self.limits, now) if reached(used, self.limits) else None

    # -- the steps ---------------------------------------------------------------------

    async def admit(self, job_id: int, pages: int | None) -> None:
        """Reserve the pages of the conversion about to be paid for, or raise
        ``BudgetReached`` when they would pass a limit."""
        if not self.enabled:
            return
        now = self.clock()
        self._roll(now)
        if self._stale(now):
            async with self._lock:
                if self._stale(self.clock()):
                    await self.refresh()
        self._reserved.pop(job_id, None)  # a second attempt replaces the first
        wanted = max(1, pages or 1)
        hold = decide(self.used(), wanted, self.limits, now)
        if hold is None:
            self._reserved[job_id] = (wanted, now)
            self._show()
            return
        self._note_hold(job_id, hold)
        raise BudgetReached(hold.sentence())

    def release(self, job_id: int) -> None:
        """The admitted conversion was not created after all: free its pages."""
        if self._reserved.pop(job_id, None) is not None:
            self._reconsider()

    def settle(self, job_id: int, pages: int | None) -> None:
        """The hub ended a conversion of ``job_id``, billing ``pages`` (None: nothing
        new to count): its reservation gives way to what was billed."""
        self._roll(self.clock())
        self._reserved.pop(job_id, None)
        if pages:
            self._today += pages
            self._month += pages
            self._warn_if_near()
        self._reconsider()

    async def refresh(self) -> None:
        """Read the sums of the current period from the state database."""
        if not self.enabled:
            return
        started = self.clock()
        self._roll(started)
        keys = self._keys
        (day_start, _), (month_start, month_end) = day_bounds(started), month_bounds(started)
        found = await self.load(day_start, month_start, month_end)
        if self._keys != keys:
            return  # the period turned meanwhile: the next admission reads again
        self._today, self._month = found.today, found.month
        # What the database shows at the hub stays until it is billed; what was admitted
        # here and is not there yet stays a while (its creation may still be going on).
        known = {job_id: since for job_id, (_, since) in self._reserved.items()}
        fresh = {
            job_id: (pages, known.get(job_id, -math.inf)) for job_id, pages in found.at_hub.items()
        }
        for job_id, (pages, since) in self._reserved.items():
            if job_id not in fresh and since >= started - RESERVATION_SECONDS:
                fresh[job_id] = (pages, since)
        self._reserved = fresh
        self._loaded_at = started
        self._warn_if_near()
        self._reconsider()

    # -- bookkeeping -------------------------------------------------------------------

    def _stale(self, now: float) -> bool:
        loaded = self._loaded_at
        return loaded is None or not 0 <= now - loaded < REFRESH_SECONDS

    def _roll(self, now: float) -> None:
        """Start new sums when the day or the month turned; a hold of a past period lifts."""
        keys = period_keys(now)
        old = self._keys
        if keys != old:
            if old is None or keys[1] != old[1]:
                self._month = 0
            if old is None or keys[0] != old[0]:
                self._today = 0
            self._keys, self._loaded_at = keys, None
        if self._hold is not None and self._hold.resumes <= now:
            self._hold = None
            log.info("a new period began: the page budget admits conversions again")
        self._show()

    def _note_hold(self, job_id: int, hold: Hold) -> None:
        if hold.too_big:
            if job_id not in self._too_big_said:
                self._too_big_said.add(job_id)
                log.warning(hold.sentence(), job_id=job_id, code=BudgetReached.code)
            return
        if self._hold is None:
            log.warning(
                hold.sentence() + "; new conversions wait, conversions at the hub finish",
                code=BudgetReached.code,
            )
        self._hold = hold
        self._show()

    def _reconsider(self) -> None:
        """Lift the hold when the conversion it waits for fits after all (pages freed)."""
        hold = self._hold
        if hold is not None and decide(self.used(), hold.pages, self.limits, self.clock()) is None:
            self._hold = None
            log.info("pages were freed: the page budget admits conversions again")
            self.on_change()
        self._show()

    def _warn_if_near(self) -> None:
        assert self._keys is not None
        for period, key, billed, limit in (
            ("day", self._keys[0], self._today, self.limits.per_day),
            ("month", self._keys[1], self._month, self.limits.per_month),
        ):
            if key not in self._warned and nearly_spent(billed, limit):
                self._warned.add(key)
                when = "today" if period == "day" else "this month"
                log.warning(
                    f"{int(WARN_SHARE * 100)} % of the page budget is used: "
                    f"{billed} of {limit} pages {when}",
                    period=period,
                )

    def _show(self) -> None:
        if not self.enabled:
            return
        reserved = sum(pages for pages, _ in self._reserved.values())
        used = Used(self._today + reserved, self._month + reserved)
        held = self._hold is not None or reached(used, self.limits)
        metrics.show_budget(used.today, used.month, held)
