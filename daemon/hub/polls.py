"""The poll scheduler: one planner for every remote job in flight, few polls at any length.

Polling each job on its own costs requests in proportion to how long it runs. Instead,
``Poller`` keeps every job the daemon waits on and decides which to look at, when and
how (``choose``, a pure function of the time and the jobs):

- a job whose end is unknown is looked at once it has run a little, by one
  ``GET /renderocr/jobs`` that reports the progress of every job at once;
- from a job's ``progress`` and the hub's own timestamps its end is estimated, with how
  far off the estimate may be (whole-second timestamps at 10 % progress: 10 s either
  way), and from the durations of earlier jobs (per page and engine, kept across
  restarts) before it reports any progress;
- near its estimated end the job gets one long poll (``?wait``) that answers the moment
  it finishes, once the estimate is close enough for the poll's wait to cover it (a
  rough one is refined by a later listing first), or, when the hub ignores ``wait``,
  one plain poll just after it (never two looks at a job less than a second apart);
- a listing made for one job informs every other; a job it finds with no progress
  yet keeps its own plan;
- when several jobs are due together, one listing serves them all; while nothing is
  learned of an engine, only one of its jobs probes with a long poll.

Whether the hub honours ``wait`` is learned from its answers (a long poll answered at
once on an unfinished job means it does not), as is whether the listing covers every
job (a paged listing leaves some out, and those are polled one by one).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.errors import JobFailed, LdxError, RemoteNotFound
from daemon.hub.client import HubClient
from daemon.hub.models import JobState, RemoteJob, epoch
from daemon.logs import get_logger

log = get_logger(component="polls")

LIST_AGE = 2.0  # seconds a new job runs before its progress is worth reading
LIST_SHARE = 0.4  # ... or this share of its expected length, to read several at once
FIRST_LOOK_MAX = 20.0  # ... but no later: a job far shorter than the usual is not left alone
LEAD = 1.0  # seconds of slack between a long poll's wait and the expected end
MARGIN = 0.3  # seconds after an expected end that a plain poll looks
MIN_GAP = 1.0  # seconds at least between two plain looks at one job
RESOLUTION = 1.0  # seconds: a hub's timestamps may be whole seconds
BACKOFF = (2.0, 4.0, 8.0, 15.0, 30.0)  # when a job's end cannot be estimated
TOGETHER = 0.5  # jobs due within this many seconds are served by one listing
LIST_GAP = 0.5  # seconds at least between two listings
ALPHA = 0.2  # weight of the newest duration in the learned average


@dataclass
class Watch:
    """A remote job the daemon waits on, as the scheduler sees it."""

    remote_job_id: str
    engine: str
    pages: int
    started: float  # monotonic time the daemon started watching (about its creation)
    due: float
    expected_end: float | None = None  # monotonic
    spread: float = 0.0  # seconds the expected end may be off, either way
    rough: bool = False  # too far off for a long poll to cover: refine by a listing first
    polls: int = 0
    busy: bool = False  # a request about it is under way
    future: asyncio.Future[RemoteJob] = field(default_factory=asyncio.Future)


@dataclass(frozen=True)
class Action:
    """What the scheduler does next: sleep, list every job, or poll one."""

    kind: str  # "sleep", "list" or "poll"
    until: float = math.inf  # for "sleep"
    watch: Watch | None = None  # for "poll"
    wait: float = 0.0  # a long poll's wait, for "poll"


def choose(now: float, watches: list[Watch], *, can_list: bool, long_polls: bool) -> Action:
    """The next action at ``now`` (pure). A job whose end is estimated gets a long poll
    when the hub honours them (it answers the moment the job ends); jobs of unknown end,
    and jobs due together when it does not, share one listing."""
    idle = [w for w in watches if not w.busy]
    due = sorted((w for w in idle if w.due <= now), key=lambda w: w.due)
    if not due:
        return Action("sleep", until=min((w.due for w in idle), default=math.inf))
    first = due[0]
    if long_polls and _pollable(first):
        return Action("poll", watch=first)
    listed = [w for w in idle if w.due <= now + TOGETHER and not (long_polls and _pollable(w))]
    unknown = (first.expected_end is None or first.rough) and len(idle) > 1
    if can_list and (len(listed) > 1 or unknown):
        return Action("list")
    return Action("poll", watch=first)


def _pollable(watch: Watch) -> bool:
    """Whether a long poll on ``watch`` is likely to catch its end."""
    return watch.expected_end is not None and not watch.rough


def estimate_end(watch: Watch, job: RemoteJob, now: float) -> tuple[float, float] | None:
    """When ``job`` will end (monotonic) and how far off that may be, either way, from
    its progress and the hub's timestamps (None: no progress to go by)."""
    progress = job.progress or 0.0
    if progress <= 0.0 or progress >= 1.0:
        return None
    created, updated = epoch(job.created_at), epoch(job.updated_at)
    if created is not None and updated is not None and updated > created:
        run = updated - created  # the hub's clock: the time it took to get this far
        lag = max(0.0, now - watch.started - run)  # since that update, in our clock
        coarse = created.is_integer() and updated.is_integer()
        # Whole-second stamps make ``run`` up to a second off, and the rest 1/progress times.
        spread = (RESOLUTION if coarse else 0.1) / progress
        return now - lag + run * (1 - progress) / progress, spread
    ran = now - watch.started
    remaining = ran * (1 - progress) / progress
    return now + remaining, RESOLUTION + remaining / 4  # the progress's own step is unknown


def next_due(watch: Watch, now: float, *, max_wait: float, prior: float | None) -> float:
    """When to look at ``watch`` again, given what is known of its end."""
    end = watch.expected_end
    if end is None:
        age = min(max(LIST_AGE, LIST_SHARE * prior), FIRST_LOOK_MAX) if prior else LIST_AGE
        first = watch.started + age
        if watch.polls == 0 and first > now:
            return first
        step = BACKOFF[min(watch.polls, len(BACKOFF)) - 1 if watch.polls else 0]
        # No progress yet after a while: a longer job; look again after half its age more.
        return now + max(step, (now - watch.started) / 2)
    if max_wait <= 0:
        return max(now + MIN_GAP, end + MARGIN)
    if watch.rough:  # look again half-way there, when the progress says more
        return max(now + MIN_GAP, now + (end - now) / 2)
    # The wait covers the end and the estimate's spread after it.
    return max(now, end - max_wait + min(max_wait / 2, LEAD + watch.spread))


def is_rough(spread: float, max_wait: float) -> bool:
    """Whether an estimate this far off is too rough for one long poll to catch."""
    return max_wait > 0 and LEAD + spread > max_wait / 2


class Durations:
    """How long jobs take per page, per engine, learned as the daemon runs."""

    def __init__(self, known: dict[str, float] | None = None) -> None:
        self.per_page: dict[str, float] = dict(known or {})
        self.changed = False

    def prior(self, engine: str, pages: int) -> float | None:
        """The expected length of a job of ``pages`` pages (None: nothing learned yet)."""
        per_page = self.per_page.get(engine)
        return None if per_page is None else per_page * max(1, pages)

    def learn(self, engine: str, pages: int, seconds: float) -> None:
        """Take one finished job's length into the average."""
        sample = max(0.0, seconds) / max(1, pages)
        before = self.per_page.get(engine)
        self.per_page[engine] = sample if before is None else before + ALPHA * (sample - before)
        self.changed = True


class Poller:
    """Waits on every remote job in flight with as few requests as it can (``run``)."""

    def __init__(
        self,
        client: HubClient,
        *,
        max_wait: float = 10.0,
        durations: Durations | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_wait``: the longest long poll (0: the hub is never asked to hold)."""
        self._client = client
        self.max_wait = max_wait
        self.durations = durations or Durations()
        self._clock = clock
        self._watches: dict[str, Watch] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.can_list = True
        self.requests = {"poll": 0, "list": 0}
        self._last_list = -math.inf
        self.unknown_statuses: set[str] = set()  # said once each in the log

    async def until_final(self, remote_job_id: str, *, engine: str, pages: int | None) -> RemoteJob:
        """The job once the hub says it completed or failed (or RemoteNotFound)."""
        watch = self._watches.get(remote_job_id)
        if watch is None:
            now = self._clock()
            watch = Watch(remote_job_id, engine, pages or 1, now, now)
            watch.future = asyncio.get_running_loop().create_future()
            self._plan_first_look(watch, now, probe=not self._probing(engine))
            self._watches[remote_job_id] = watch
            self._wake.set()
        try:
            return await asyncio.shield(watch.future)
        except asyncio.CancelledError:
            self._forget(watch)  # its job let go (a stop, a lost lease): stop looking
            raise

    def _plan_first_look(self, watch: Watch, now: float, *, probe: bool) -> None:
        """A new job's first look. Short, or of unknown length (for one job of an engine
        at a time, the probe): one long poll catches its end, or reports its progress
        when the wait runs out. Else a listing after a share of its expected length."""
        prior = self.durations.prior(watch.engine, watch.pages)
        if self.max_wait > 0 and (prior is not None and prior <= self.max_wait):
            watch.expected_end = now + prior
        elif self.max_wait > 0 and prior is None and probe:
            watch.expected_end = now + self.max_wait - LEAD
        watch.due = next_due(watch, now, max_wait=self.max_wait, prior=prior)

    def _probing(self, engine: str) -> bool:
        """Whether a job of ``engine`` of unknown length is on its first long poll."""
        if self.durations.prior(engine, 1) is not None:
            return False
        return any(w.engine == engine and w.polls == 0 for w in self._watches.values())

    def _replan(self, engine: str, now: float) -> None:
        """A length was learned: jobs of ``engine`` not looked at yet plan with it."""
        for watch in self._watches.values():
            if watch.engine == engine and watch.polls == 0 and not watch.busy:
                watch.expected_end, watch.spread, watch.rough = None, 0.0, False
                self._plan_first_look(watch, now, probe=False)
        self._wake.set()

    def _forget(self, watch: Watch) -> None:
        if self._watches.get(watch.remote_job_id) is watch:
            del self._watches[watch.remote_job_id]
        watch.future.cancel()

    async def run(self) -> None:
        """Plan and send the polls until cancelled."""
        try:
            while True:
                now = self._clock()
                action = choose(
                    now,
                    list(self._watches.values()),
                    can_list=self.can_list,
                    long_polls=self.max_wait > 0,
                )
                if action.kind == "sleep":
                    await self._sleep(action.until)
                elif action.kind == "list" and now < self._last_list + LIST_GAP:
                    await self._sleep(self._last_list + LIST_GAP)  # never a storm of listings
                elif action.kind == "list":
                    self._last_list = now
                    await self._list()
                elif action.watch is not None:
                    self._poll_soon(action.watch)
        finally:
            for task in self._tasks:
                task.cancel()

    async def _sleep(self, until: float) -> None:
        self._wake.clear()
        timeout = None if math.isinf(until) else max(0.0, until - self._clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _poll_soon(self, watch: Watch) -> None:
        watch.busy = True
        # The whole wait: the hub answers the moment the job ends, so a longer hold costs
        # nothing and saves a second poll when the job runs late.
        wait = self.max_wait
        task = asyncio.get_running_loop().create_task(self._poll(watch, wait))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self, watch: Watch, wait: float) -> None:
        asked = self._clock()
        self.requests["poll"] += 1
        try:
            job = await self._client.get_job(watch.remote_job_id, wait=wait)
        except RemoteNotFound as exc:
            self._settle(watch, error=exc)
            return
        except JobFailed as exc:
            if wait > 0 and not isinstance(exc, RemoteNotFound):
                self.max_wait = 0.0  # the hub refuses ?wait: plain polls from now on
                watch.due = self._clock()
            else:
                self._settle(watch, error=exc)
            return
        except LdxError:
            watch.polls += 1
            watch.due = self._clock() + BACKOFF[min(watch.polls, len(BACKOFF)) - 1]
            return
        finally:
            watch.busy = False
            self._wake.set()
        if wait > 1.0 and job.state.running and self._clock() - asked < wait / 2:
            self.max_wait = 0.0  # answered at once although unfinished: ?wait is ignored
        self._seen(watch, job)

    async def _list(self) -> None:
        self.requests["list"] += 1
        watches = [w for w in self._watches.values() if not w.busy]
        try:
            jobs = {job.job_id: job for job in await self._client.list_jobs()}
        except JobFailed:
            self.can_list = False  # no listing here: every job is polled on its own
            return
        except LdxError:
            now = self._clock()
            for watch in watches:
                watch.due = max(watch.due, now + BACKOFF[0])
            return
        now = self._clock()
        for watch in watches:
            job = jobs.get(watch.remote_job_id)
            if job is None:  # a paged listing: look at this one directly
                watch.due, watch.expected_end = now, watch.expected_end or now
                continue
            self._seen(watch, job)

    def _seen(self, watch: Watch, job: RemoteJob) -> None:
        if self._watches.get(watch.remote_job_id) is not watch:
            return  # forgotten meanwhile
        now = self._clock()
        if not job.state.running:
            watch.polls += 1
            if job.state is JobState.COMPLETED and job.output_file_id is None:
                watch.due = now  # a listing's summary without the output: ask the job
                watch.expected_end, watch.rough = now, False
                return
            self._learn(watch, job, now)
            self._settle(watch, job=job)
            return
        if job.state is JobState.UNKNOWN:
            self._unknown(job)
        estimate = estimate_end(watch, job, now)
        if estimate is None and watch.due > now:
            # Read along with others, no progress yet: its own look can wait as long again.
            watch.due = max(watch.due, now + max(BACKOFF[0], (now - watch.started) / 2))
            return
        watch.polls += 1
        watch.expected_end, watch.spread = estimate if estimate else (None, 0.0)
        watch.rough = estimate is not None and is_rough(watch.spread, self.max_wait)
        prior = self.durations.prior(watch.engine, watch.pages)
        watch.due = next_due(watch, now, max_wait=self.max_wait, prior=prior)

    def _unknown(self, job: RemoteJob) -> None:
        """A status outside the four: the job is polled on, and the log says so once."""
        if job.status in self.unknown_statuses:
            return
        self.unknown_statuses.add(job.status)
        log.warning(
            "the hub reports a job status this version does not know; taking it as "
            "still running and polling on until the job ends or its deadline (job_deadline)",
            status=job.status,
            remote_job_id=job.job_id,
        )

    def _learn(self, watch: Watch, job: RemoteJob, now: float) -> None:
        if job.state is not JobState.COMPLETED:
            return
        created, done = epoch(job.created_at), epoch(job.completed_at)
        seconds = now - watch.started
        if created is not None and done is not None:
            seconds = done - created  # the hub's own clock: exact, whatever our polls
        pages = job.usage.input_pages if job.usage and job.usage.input_pages else watch.pages
        first = self.durations.prior(watch.engine, 1) is None
        self.durations.learn(watch.engine, pages, seconds)
        if first:
            self._replan(watch.engine, now)

    def _settle(
        self, watch: Watch, *, job: RemoteJob | None = None, error: Exception | None = None
    ) -> None:
        self._watches.pop(watch.remote_job_id, None)
        if watch.future.done():
            return
        if error is not None:
            watch.future.set_exception(error)
        elif job is not None:
            watch.future.set_result(job)
