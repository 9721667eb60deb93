"""The page budget: the decision, the running sums, the brake, and a daemon held and resumed."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from daemon import logs
from daemon.cli import main
from daemon.config import Settings, load_settings
from daemon.emulator.hub import pages_billed, paid_conversions
from daemon.emulator.server import EmulatorServer
from daemon.errors import BudgetReached, ConfigError
from daemon.jobs.model import Job, NewJob, RemoteRecord, Stage, Status
from daemon.jobs.store import Store
from daemon.jobs.tables import jobs_table
from daemon.jobs.views import PagesUsed, Views
from daemon.ops import metrics
from daemon.ops.usage import day_bounds
from daemon.pipeline.budget import (
    RESERVATION_SECONDS,
    PageBudget,
    PageLimits,
    Used,
    decide,
)
from daemon.service import Service, prepare
from tests.conftest import daemon_config
from tests.helpers import enqueue, wait_async
from tests.scans import make_scan


def ts(text: str) -> float:
    """Epoch seconds of an ISO time in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


NOW = ts("2025-03-10T15:30:00")
DAY = PageLimits(per_day=100)
MONTH = PageLimits(per_month=1000)


# -- the decision (pure) ----------------------------------------------------------------------


def test_a_conversion_that_fits_goes() -> None:
    """Within both limits, up to the last page, nothing holds."""
    both = PageLimits(per_day=100, per_month=1000)
    assert decide(Used(90, 900), 10, both, NOW) is None
    assert decide(Used(10**6, 10**6), 50, PageLimits(), NOW) is None


def test_a_conversion_that_would_pass_the_day_waits_for_tomorrow() -> None:
    """11 pages more than 90 of 100 today: held, resuming on the next UTC day."""
    hold = decide(Used(90, 90), 11, DAY, NOW)
    assert hold is not None
    assert hold.resumes == ts("2025-03-11T00:00:00")
    assert hold.sentence() == "page budget reached: 90 of 100 today; resumes on 2025-03-11"


def test_the_month_is_said_before_the_day() -> None:
    """When both would pass, the month's hold (the longer wait) is the one given."""
    hold = decide(Used(100, 995), 10, PageLimits(per_day=100, per_month=1000), NOW)
    assert hold is not None
    assert hold.sentence() == "page budget reached: 995 of 1000 this month; resumes on 2025-04-01"
    december = decide(Used(0, 1000), 1, MONTH, ts("2025-12-31T23:59:59"))
    assert december is not None
    assert december.sentence().endswith("resumes on 2026-01-01")


def test_a_file_larger_than_the_budget_says_so() -> None:
    """A file with more pages than a whole day allows waits for a raise, not for a date."""
    hold = decide(Used(0, 0), 150, DAY, NOW)
    assert hold is not None
    assert hold.too_big
    assert "has 150 pages, more than pages_per_day = 100 allows" in hold.sentence()


# -- the running sums -------------------------------------------------------------------------


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Loader:
    """The database's answer, and the periods it was asked for."""

    def __init__(self, found: PagesUsed | None = None) -> None:
        self.found = found or PagesUsed(0, 0, {})
        self.asked: list[tuple[float, float, float]] = []

    async def __call__(self, day_start: float, month_start: float, until: float) -> PagesUsed:
        self.asked.append((day_start, month_start, until))
        return self.found


def budget(
    limits: PageLimits, clock: Clock, loader: Loader | None = None
) -> tuple[PageBudget, list[str]]:
    """A budget on ``clock``, and the list its wake-ups are noted in."""
    woken: list[str] = []
    pages = PageBudget(limits, loader or Loader(), clock=clock, on_change=lambda: woken.append("x"))
    return pages, woken


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The JSON log lines written during the test."""
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logs.configure("info", "auto")


def test_jobs_in_flight_together_cannot_pass_the_limit() -> None:
    """Admitted pages are reserved: the second of two 3-page jobs under 4 a day waits, and
    the brake says so until the day turns (and says when)."""
    clock = Clock(NOW)
    pages, _ = budget(PageLimits(per_day=4), clock)

    async def scenario() -> None:
        await pages.admit(1, 3)
        assert pages.holding() is None
        with pytest.raises(BudgetReached) as info:
            await pages.admit(2, 3)
        assert info.value.message == "page budget reached: 3 of 4 today; resumes on 2025-03-11"
        assert pages.holding() == info.value.message
        assert pages.lifts_in() == 300.0  # a held worker looks at the clock this often
        clock.now = ts("2025-03-10T23:58:00")
        assert pages.lifts_in() == 120.0  # and wakes when the day turns
        pages.settle(1, 3)  # billed as counted: still no room
        assert pages.holding() == info.value.message
        clock.now = ts("2025-03-11T00:00:00")
        assert pages.holding() is None
        assert pages.lifts_in() is None
        await pages.admit(2, 3)

    asyncio.run(scenario())


def test_freed_pages_lift_the_hold_and_wake_the_worker() -> None:
    """A reserved conversion that was not created (or billed less) frees its pages: the
    held conversion fits again at once, without waiting for the day to turn."""
    clock = Clock(NOW)
    pages, woken = budget(PageLimits(per_day=4), clock)

    async def scenario() -> None:
        await pages.admit(1, 3)
        with pytest.raises(BudgetReached):
            await pages.admit(2, 2)
        pages.release(1)
        assert pages.holding() is None
        assert woken == ["x"]
        await pages.admit(2, 2)
        await pages.admit(3, 2)
        with pytest.raises(BudgetReached):
            await pages.admit(4, 1)
        pages.settle(3, 1)  # the hub billed 1 page, not 2
        assert woken == ["x", "x"]
        await pages.admit(4, 1)

    asyncio.run(scenario())


def test_the_sums_are_read_at_start_per_period_and_from_time_to_time() -> None:
    """The database is asked for the current day and month; again when the day turns and
    after a minute; its conversions at the hub count, recent reservations are kept."""
    clock = Clock(NOW)
    loader = Loader(PagesUsed(today=40, month=700, at_hub={7: 5}))
    pages, _ = budget(PageLimits(per_day=100, per_month=1000), clock, loader)

    async def scenario() -> None:
        await pages.refresh()
        assert loader.asked == [
            (ts("2025-03-10T00:00:00"), ts("2025-03-01T00:00:00"), ts("2025-04-01T00:00:00"))
        ]
        assert pages.used() == Used(45, 705)
        await pages.admit(1, 10)  # read less than a minute ago: not read again
        assert len(loader.asked) == 1
        assert pages.used() == Used(55, 715)
        clock.now += 61
        loader.found = PagesUsed(today=50, month=710, at_hub={})  # job 7 was billed
        await pages.admit(2, 1)
        assert len(loader.asked) == 2
        assert pages.used() == Used(61, 721)  # jobs 1 and 2 reserved, 7 gone
        clock.now = ts("2025-03-11T08:00:00")
        assert pages.used().today == 11  # a new day: only the reservations
        await pages.admit(3, 1)
        assert loader.asked[-1][0] == ts("2025-03-11T00:00:00")
        clock.now += RESERVATION_SECONDS + 61
        await pages.admit(4, 1)  # jobs 1-3 never reached the hub: their pages are freed
        assert pages.used() == Used(51, 711)

    asyncio.run(scenario())


def test_a_warning_at_80_percent_once_per_period(
    log_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    """Billing past 80 % of a limit warns once that day (and once that month)."""
    clock = Clock(NOW)
    pages, _ = budget(PageLimits(per_day=10, per_month=1000), clock)

    async def scenario() -> None:
        await pages.refresh()
        for job_id in range(1, 6):
            await pages.admit(job_id, 2)
            pages.settle(job_id, 2)

    asyncio.run(scenario())
    warned = [line["event"] for line in log_lines() if line["level"] == "warning"]
    assert warned == ["80 % of the page budget is used: 8 of 10 pages today"]


def test_without_limits_nothing_is_read_or_held() -> None:
    """No [budget]: admissions never wait and the database is never asked."""
    loader = Loader(PagesUsed(10**9, 10**9, {}))
    pages, _ = budget(PageLimits(), Clock(NOW), loader)

    async def scenario() -> None:
        await pages.refresh()
        await pages.admit(1, 10**6)

    asyncio.run(scenario())
    assert loader.asked == []
    assert pages.holding() is None


# -- the brake in the queue ---------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new state database: an SQLite file, or one on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def new_job(path: str, pages: int = 1) -> NewJob:
    """A queued input of ``pages`` pages."""
    return NewJob(path, 10, 1, hash(path) % 10**6, "pdf", "ki/ocr", "jpn", "docx", pages=pages)


def test_while_new_work_is_held_only_jobs_past_their_payment_are_claimed(db_url: str) -> None:
    """Without new work: jobs at the hub and beyond, and creations maybe sent; never a job
    still to upload, one to convert again, or one that waits for the budget."""
    store = Store(db_url)
    stages = {
        "pending.pdf": (Stage.PENDING, None),
        "uploaded.pdf": (Stage.UPLOADED, None),
        "maybe-sent.pdf": (Stage.SUBMITTING, "hub_unavailable"),
        "held.pdf": (Stage.SUBMITTING, BudgetReached.code),
        "at-hub.pdf": (Stage.SUBMITTED, None),
        "fetching.pdf": (Stage.DOWNLOADING, None),
        "kept.pdf": (Stage.DOWNLOADED, None),
        "published.pdf": (Stage.PUBLISHED, None),
    }
    try:
        for path, (stage, code) in stages.items():
            job = enqueue(store, new_job(path), path + ".docx", 1.0)
            assert job is not None
            with store.write() as conn:
                change = update(jobs_table).where(jobs_table.c.id == job.id)
                conn.execute(change.values(stage=stage.value, error_code=code))
        claimed = store.claim(2.0, 20, [], "me", 30.0, new_work=False)
        assert sorted(c.job.path for c in claimed) == [
            "at-hub.pdf",
            "fetching.pdf",
            "kept.pdf",
            "maybe-sent.pdf",
            "published.pdf",
        ]
        assert store.next_due("me", new_work=False) is None
        rest = store.claim(2.0, 20, [c.job.id for c in claimed], "me", 30.0)
        assert sorted(c.job.path for c in rest) == ["held.pdf", "pending.pdf", "uploaded.pdf"]
    finally:
        store.close()


def test_pages_used_counts_the_billed_and_the_unbilled_at_the_hub(db_url: str) -> None:
    """The budget's read: pages billed today and this month, and jobs converting at the
    hub whose remote job is not billed yet (with their counted pages)."""
    store = Store(db_url)
    try:
        jobs = [
            enqueue(store, new_job(f"d/{n}.pdf", pages=n + 2), f"{n}.docx", 1.0) for n in range(3)
        ]
        ids = [job.id for job in jobs if job is not None]
        with store.write() as conn:
            for job_id, remote in zip(ids, ("r0", "r1", "r2"), strict=True):
                change = update(jobs_table).where(jobs_table.c.id == job_id)
                conn.execute(change.values(stage=Stage.SUBMITTED.value, remote_job_id=remote))
        billed = store.get(ids[0])
        assert billed is not None
        store.record_usage(
            billed, RemoteRecord(ids[0], "r0", "f", None, "completed", pages=4), "d", NOW
        )
        old = RemoteRecord(ids[1], "old", "f", None, "failed", pages=9)
        store.record_usage(billed, old, "d", ts("2025-03-02T00:00:00"))
        found = Views(store).pages_used(*day_bounds(NOW)[:1], ts("2025-03-01"), ts("2025-04-01"))
        assert found == PagesUsed(today=4, month=13, at_hub={ids[1]: 3, ids[2]: 4})
    finally:
        store.close()


# -- configuration --------------------------------------------------------------------------


def with_budget(config: Path, text: str) -> Path:
    """``config`` with a [budget] table."""
    config.write_text(
        config.read_text(encoding="utf-8") + f"\n[budget]\n{text}\n", encoding="utf-8"
    )
    return config


def test_budget_settings_from_file_and_environment(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """[budget] reads both limits; LDX_HOTFOLDER_BUDGET__PAGES_PER_DAY overrides the file."""
    config = with_budget(
        daemon_config(tmp_path, folders, "http://127.0.0.1:9"), "pages_per_month = 900"
    )
    settings = load_settings(config)
    assert (settings.budget.pages_per_day, settings.budget.pages_per_month) == (None, 900)
    monkeypatch.setenv("LDX_HOTFOLDER_BUDGET__PAGES_PER_DAY", "50")
    assert load_settings(config).budget.pages_per_day == 50


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("pages_per_week = 5", "budget.pages_per_week: unknown key"),
        ("pages_per_day = 0", "budget.pages_per_day"),
        ("pages_per_month = -3", "budget.pages_per_month"),
        ("pages_per_day = 2.5", "budget.pages_per_day"),
    ],
)
def test_bad_budget_settings_are_refused(
    tmp_path: Path, folders: dict[str, Path], text: str, said: str
) -> None:
    """An unknown key or a limit that is not a positive whole number stops with its name."""
    config = with_budget(daemon_config(tmp_path, folders, "http://127.0.0.1:9"), text)
    with pytest.raises(ConfigError, match=said.replace(".", r"\.")):
        load_settings(config)


def test_an_unknown_budget_variable_is_refused(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LDX_HOTFOLDER_BUDGET__PAGES (no such setting) is an error, not ignored."""
    monkeypatch.setenv("LDX_HOTFOLDER_BUDGET__PAGES", "5")
    with pytest.raises(ConfigError, match="LDX_HOTFOLDER_BUDGET__PAGES"):
        load_settings(daemon_config(tmp_path, folders, "http://127.0.0.1:9"))


def test_status_shows_pages_today_and_this_month_and_the_hold(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """status (text and JSON) shows the pages billed today and this month against the
    budget, and the budget's sentence once not a page is left."""
    config = with_budget(
        daemon_config(tmp_path, folders, "http://127.0.0.1:9"), "pages_per_day = 5"
    )
    store = Store(load_settings(config).database_url)
    try:
        job = enqueue(store, new_job("a/x.pdf", pages=5), "a/x.docx", 1.0)
        assert job is not None
        now = datetime.now(UTC).timestamp()
        for n, pages in enumerate((3, 2)):
            record = RemoteRecord(job.id, f"r{n}", "f", None, "completed", pages=pages)
            store.record_usage(job, record, "a", now)
    finally:
        store.close()
    tomorrow = datetime.fromtimestamp(day_bounds(now)[1], UTC).strftime("%Y-%m-%d")
    sentence = f"page budget reached: 5 of 5 today; resumes on {tomorrow}"
    assert main(["status", "-c", str(config), "--no-hub", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["pages"] == {
        "today": 5,
        "this_month": 5,
        "pages_per_day": 5,
        "pages_per_month": None,
        "held": sentence,
    }
    assert main(["status", "-c", str(config), "--no-hub"]) == 0
    text = capsys.readouterr().out
    assert "pages    5 today (of 5), 5 this month" in text
    assert f"budget   {sentence}" in text


# -- a daemon held by the budget, and resumed when the day turns ----------------------------------


@asynccontextmanager
async def daemon_on(settings: Settings, clock: Callable[[], float]) -> AsyncIterator[Service]:
    """``run`` in this loop with the budget and the billing on ``clock`` (the emulator's)."""
    service = Service(settings, prepare(settings), once=False)
    service.pages.clock = clock
    service.steps.clock = clock
    runner = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 30)
        yield service
    finally:
        service.request_stop()
        await runner


def job_of(service: Service, path: str) -> Job | None:
    """The newest job of ``path``."""
    return service.views.latest_for_path(path)


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """A command's JSON output."""
    capsys.readouterr()
    assert main(list(args)) in (0, 1)
    return json.loads(capsys.readouterr().out)


def sample(name: str, **labels: str) -> float:
    """A metric's current value (0 when it has none yet)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_budget_holds_new_work_fails_nothing_and_resumes_when_the_day_turns(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """4 pages a day: of two 3-page PDFs one converts, the other waits (processing, no error
    file), a new file is not even claimed; status, health, explain and the metrics say why;
    when the (emulator's) clock passes midnight both convert, and usage shows both days."""
    hub_clock = emulator.hub.clock

    def clock() -> float:
        return hub_clock.now().timestamp()

    midnight = day_bounds(clock() + 700)[1]
    hub_clock.advance(midnight - 600 - clock())  # ten minutes before a UTC midnight
    today = datetime.fromtimestamp(midnight - 1, UTC).strftime("%Y-%m-%d")
    tomorrow = datetime.fromtimestamp(midnight, UTC).strftime("%Y-%m-%d")
    config = with_budget(
        daemon_config(tmp_path, folders, emulator.url, heartbeat_interval=0.3),
        "pages_per_day = 4",
    )
    settings = load_settings(config)
    inbox = folders["inbox"]
    for folder in ("dept-a", "dept-b"):
        (inbox / folder).mkdir()
    sentence = f"page budget reached: 3 of 4 today; resumes on {tomorrow}"
    billed_a = sample("ldx_hotfolder_pages_billed_total", folder="dept-a")

    async def scenario() -> None:
        async with daemon_on(settings, clock) as service:
            hub_clock.subscribe(service.worker.wake)  # the worker's timer, on this clock
            (inbox / "dept-a" / "a.pdf").write_bytes(make_scan("pdf", 1, pages=3))
            (inbox / "dept-b" / "b.pdf").write_bytes(make_scan("pdf", 2, pages=3))
            await wait_async(lambda: service.worker.holding_back() == sentence, what="the hold")
            await wait_async(
                lambda: Status.COMPLETED in {_status(service, p) for p in PDFS},
                what="one conversion",
            )
            held = next(p for p in PDFS if _status(service, p) is not Status.COMPLETED)
            (inbox / "dept-a" / "c.png").write_bytes(make_scan("png", 3))
            await wait_async(lambda: job_of(service, "dept-a/c.png") is not None, what="c queued")
            beat = settings.heartbeat_path
            await wait_async(lambda: sentence in beat.read_text(encoding="utf-8"), what="beat")
            await _check_held(service, held, capsys, config)
            hub_clock.advance(midnight + 1 - clock())
            await wait_async(
                lambda: all(
                    _status(service, p) is Status.COMPLETED for p in (*PDFS, "dept-a/c.png")
                ),
                timeout=60,
                what="every conversion",
            )
            # 3 + 1 pages today: the day's budget is spent, and the brake says so.
            after = datetime.fromtimestamp(midnight + 86400, UTC).strftime("%Y-%m-%d")
            spent = f"page budget reached: 4 of 4 today; resumes on {after}"
            assert service.worker.holding_back() == spent
            assert not service.views.jobs(Status.FAILED)

    asyncio.run(scenario())
    ledger = emulator.hub.ledger()
    assert (paid_conversions(ledger), pages_billed(ledger)) == (3, 7)
    assert sorted(p.name for p in folders["outbox"].rglob("*") if p.is_file()) == [
        "a.docx",
        "b.docx",
        "c.docx",
    ]
    by_day = cli_json(
        capsys,
        "usage",
        "-c",
        str(config),
        "--since",
        today,
        "--until",
        tomorrow,
        "--by",
        "day",
        "--json",
    )
    assert (by_day["files"], by_day["pages"]) == (3, 7)
    assert [(r["key"], r["files"]) for r in by_day["rows"]] == [(today, 1), (tomorrow, 2)]
    by_folder = cli_json(
        capsys, "usage", "-c", str(config), "--since", today, "--until", tomorrow, "--json"
    )
    assert {r["key"]: r["pages"] for r in by_folder["rows"]} == {"dept-a": 4, "dept-b": 3}
    assert sample("ldx_hotfolder_pages_billed_total", folder="dept-a") - billed_a == 4


PDFS = ("dept-a/a.pdf", "dept-b/b.pdf")


def _status(service: Service, path: str) -> Status | None:
    job = job_of(service, path)
    return job.status if job is not None else None


async def _check_held(
    service: Service, held: str, capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """While held: one conversion paid, the held job processing without an error file, the
    new file never claimed; every view says the sentence."""
    sentence = service.worker.holding_back()
    assert sentence is not None
    job = job_of(service, held)
    assert job is not None
    assert (job.status, job.error_code, job.error_message) == (
        Status.PROCESSING,
        BudgetReached.code,
        sentence,
    )
    queued = job_of(service, "dept-a/c.png")
    assert queued is not None
    assert (queued.stage, queued.owner) == (Stage.PENDING, None)
    assert not service.views.jobs(Status.FAILED)
    assert sample("ldx_hotfolder_budget_held") == 1
    health = await asyncio.to_thread(cli_json, capsys, "health", "-c", str(config), "--json")
    assert f"new work is held back: {sentence}" in health["notes"]
    status = await asyncio.to_thread(
        cli_json, capsys, "status", "-c", str(config), "--no-hub", "--json"
    )
    assert f"new work is held back: {sentence}" in status["daemon"]["notes"]
    explained = await asyncio.to_thread(
        cli_json, capsys, "explain", "-c", str(config), held, "dept-a/c.png", "--json"
    )
    assert sentence in explained[0]["reasons"][0]
    assert explained[1]["reasons"][-1] == f"The daemon starts no new work now: {sentence}."
