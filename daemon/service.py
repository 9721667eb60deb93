"""Service: the composition root. Builds the parts and runs them (``run``, or ``once``).

The configuration is read once into ``Settings``; here, and only here, its values are
handed to each part's constructor: the state database and its single writer, the hub
client with its request budget and gate, the poll scheduler, the steps and the worker,
intake and the watcher, the disk monitor, hooks, and (for ``run``) the supervisor. Then
the start-up scan runs, and the parts run until SIGTERM/SIGINT (``run``) or until every
file in the inbox has a final job (``once``). Signal handlers only set a flag; the loops
notice it, stop taking new work, give running steps a bounded time to reach a safe
point, and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.config import (
    Settings,
    changed_settings,
    check_folders,
    failpoint_spec,
    resolve_api_key,
    service_manager,
    split_reload,
)
from daemon.errors import ConfigError, LdxError, StateDamaged, Unhealthy
from daemon.hub.budget import RequestBudget
from daemon.hub.client import HubClient, Limits
from daemon.hub.gate import Closure, Gate, Hold
from daemon.hub.polls import Durations, Poller
from daemon.inbox.filters import NameFilter
from daemon.inbox.intake import Intake, IntakeSettings
from daemon.inbox.mounts import stale_size_warnings_for
from daemon.inbox.routing import Router, check_rules, offer_from_engines
from daemon.inbox.stability import Patience
from daemon.inbox.watcher import Watcher
from daemon.jobs.database import damaged_message
from daemon.jobs.model import Instance, Status
from daemon.jobs.store import Store
from daemon.jobs.views import PagesUsed, Views
from daemon.jobs.writer import Writer
from daemon.logs import configure, get_logger
from daemon.ops import failpoints, metrics
from daemon.ops.diskspace import DiskMonitor
from daemon.ops.health import Liveness, Monitor
from daemon.ops.notify import Notifier, watchdog_interval
from daemon.ops.progress import ProgressBar, follow
from daemon.ops.supervise import Supervisor
from daemon.outbox import reconcile
from daemon.outbox.permissions import OutputPermissions, tighten_umask
from daemon.outbox.permissions import check as check_permissions
from daemon.pipeline.budget import PageBudget, PageLimits
from daemon.pipeline.commit import Commit
from daemon.pipeline.hooks import Hooks
from daemon.pipeline.steps import Steps, StepSettings
from daemon.pipeline.worker import Worker, WorkerSettings

log = get_logger(component="service")
ENGINES_REFRESH_SECONDS = 3600.0  # the engine list checks folder files between restarts
STOP_GRACE_SECONDS = 10.0  # uploads and downloads in progress get this long to finish
DURATIONS_SAVE_SECONDS = 60.0  # learned job durations are written at most this often
DEFAULT_MAX_WAIT = 3600.0  # ``once`` waits this long for held work before exit code 3


@dataclass
class Outcome:
    """What a ``once`` run did: paths per final status."""

    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    auth_rejected: str | None = None
    held: str | None = None  # why work was still held when ``--max-wait`` ran out

    @property
    def exit_code(self) -> int:
        """0 all completed, 1 some failed, 2 the key was rejected, 3 work still held."""
        if self.auth_rejected is not None:
            return 2
        if self.failed:
            return 1
        if self.unfinished:
            return 3 if self.held is not None else 1
        return 0


def prepare(settings: Settings) -> str:
    """Check folders and the key, create the outbox; return the key or raise ConfigError."""
    problems = check_folders(settings)
    if problems:
        raise ConfigError("; ".join(problems))
    key = resolve_api_key(settings.hub)
    settings.outbox.mkdir(parents=True, exist_ok=True)
    perms = OutputPermissions.of(settings.output_mode, settings.output_group)
    problem = check_permissions(settings.outbox.absolute(), perms)
    if problem:
        raise ConfigError(problem)
    if settings.archive_dir is not None:
        settings.archive_dir.mkdir(parents=True, exist_ok=True)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return key


def _intake_settings(settings: Settings, impatient: bool) -> IntakeSettings:
    hub = settings.hub
    defaults = {
        "engine": hub.engine,
        "language": hub.language,
        "output_format": hub.output_format,
        "on_success": settings.on_success,
    }
    inbox = settings.inbox.absolute()
    router = Router(
        inbox, settings.rules, defaults, archive_dir_set=settings.archive_dir is not None
    )
    patience = Patience(
        settings.quiet_period,
        settings.stalled_after,
        settings.incomplete_timeout,
        impatient=impatient,
    )
    return IntakeSettings(
        inbox=inbox,
        outbox=settings.outbox.absolute(),
        router=router,
        perms=OutputPermissions.of(settings.output_mode, settings.output_group),
        name_filter=NameFilter.with_extra(settings.ignore),
        patience=patience,
        allow_hardlinks=settings.allow_hardlinks,
        archive_dir=settings.archive_dir.absolute() if settings.archive_dir else None,
        rescan_interval=settings.rescan_interval,
    )


def _step_settings(settings: Settings) -> StepSettings:
    return StepSettings(
        inbox=settings.inbox.absolute(),
        outbox=settings.outbox.absolute(),
        held=settings.held_dir.absolute(),
        instance=settings.instance_id,
        perms=OutputPermissions.of(settings.output_mode, settings.output_group),
        allow_hardlinks=settings.allow_hardlinks,
        on_duplicate=settings.on_duplicate,
        on_success=settings.on_success,
        archive_dir=settings.archive_dir.absolute() if settings.archive_dir else None,
        max_conversions=settings.max_conversions,
        resubmit_delay=settings.resubmit_delay,
        job_deadline=settings.job_deadline,
        max_output_mb=settings.max_output_mb,
    )


def _worker_settings(settings: Settings, shared: bool) -> WorkerSettings:
    return WorkerSettings(
        inbox=settings.inbox.absolute(),
        outbox=settings.outbox.absolute(),
        instance=settings.instance_id,
        perms=OutputPermissions.of(settings.output_mode, settings.output_group),
        lease=settings.lease_seconds,
        max_in_flight=settings.max_in_flight,
        max_attempts=settings.max_attempts,
        auto_retry_after=settings.auto_retry_after,
        auto_retry_limit=settings.auto_retry_limit,
        shared=shared,
    )


class Service:
    """One daemon: every part, wired together."""

    def __init__(
        self,
        settings: Settings,
        api_key: str,
        *,
        once: bool,
        progress: bool = False,
        max_wait: float = DEFAULT_MAX_WAIT,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.once = once
        self.progress = progress
        self.max_wait = max_wait
        self.reload_settings = reload_settings
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.started_at = time.time()
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once the watcher runs and the start-up scan is done
        metrics.set_instance(settings.instance_id)
        self.store = _open_store(settings)
        self.views = Views(self.store)
        self.writer = Writer(self.store)
        self._closure: Closure | None = None
        self.gate = Gate(probe_max=settings.auth_recheck_interval, on_change=self._gate_changed)
        self.client = _hub_client(settings, api_key, self.gate)
        durations = Durations(
            {engine: per_page for engine, (per_page, _, _) in self.store.durations().items()}
        )
        self.poller = Poller(self.client, max_wait=settings.hub.poll_wait, durations=durations)
        self.commit = Commit(
            self.writer, instance=settings.instance_id, lease=settings.lease_seconds
        )
        pages = PageLimits(settings.budget.pages_per_day, settings.budget.pages_per_month)
        self.pages = PageBudget(pages, self._used)
        self.steps = Steps(
            _step_settings(settings),
            self.writer,
            self.client,
            self.poller,
            self.commit,
            pages=self.pages,
        )
        self.worker = Worker(
            _worker_settings(settings, shared=self.store.dialect != "sqlite"),
            self.writer,
            self.steps,
            self.commit,
            hooks=Hooks(settings.hooks, self._hook_failed),
        )
        self.worker.brakes.reasons = self._held_by
        self.worker.brakes.new_work = self.pages.holding
        self.worker.brakes.lifts_in = self.pages.lifts_in
        self.pages.on_change = self.worker.wake
        budget = self.client.budget
        if budget is not None:
            self.worker.brakes.budget_share = lambda: budget.share
        self.intake = Intake(
            _intake_settings(settings, impatient=once), self.writer, self.worker.wake
        )
        self.worker.on_input_changed = self.intake.forget
        self.disk = DiskMonitor(
            [settings.outbox.absolute(), settings.state_dir.absolute()],
            settings.min_free_space_mb,
            self._disk_changed,
        )
        self.worker.on_disk_full = self.disk.check_now
        self.watcher: Watcher | None = None
        self.supervisor = None if once else self._supervisor()

    def _supervisor(self) -> Supervisor:
        s = self.settings
        manager = service_manager()
        notifier = Notifier(manager.notify_socket)
        monitor = Monitor(
            self.writer,
            self.views,
            self.liveness,
            notifier,
            heartbeat_file=s.heartbeat_path,
            interval=s.heartbeat_interval,
            stall_timeout=s.stall_timeout,
            watchdog_interval=watchdog_interval(
                manager.watchdog_usec, manager.watchdog_pid, os.getpid()
            ),
        )
        address = (s.metrics_host, s.metrics_port) if s.metrics_port else None
        reload = self.reload if self.reload_settings is not None else None
        return Supervisor(monitor, notifier, metrics_address=address, reload=reload)

    # -- callbacks ---------------------------------------------------------------------

    def _hook_failed(self, job_id: int, message: str) -> None:
        record = self.writer.call(self.writer.store.record_hook_error, job_id, message)
        asyncio.get_running_loop().create_task(record)

    def _gate_changed(self, closure: Closure | None) -> None:
        metrics.PAUSED.set(0 if closure is None else 1)
        was, self._closure = self._closure, closure
        if closure is not None:
            log.error(closure.sentence(self.gate.waiting), hold=closure.hold.value)
            return
        if was is not None and was.hold is Hold.KEY:
            log.info("the API key is accepted again; resuming work")
        elif was is not None and was.hold is Hold.REFUSED:
            log.info(f"the hub accepts {was.route} again; resuming work")
        else:
            log.info("the hub answers again; held work resumes")
        self.worker.wake()

    async def _used(self, day_start: float, month_start: float, until: float) -> PagesUsed:
        """The page budget's sums, read in the single writer (in step with its commits)."""
        return await self.writer.call(self.views.pages_used, day_start, month_start, until)

    def _held_by(self) -> str | None:
        """Why no new job starts, or None: the gate, while it holds every route (a refused
        route holds only its own requests, and a waiting one is what tries it again)."""
        closure = self.gate.closure
        if closure is None or closure.hold is Hold.REFUSED:
            return None
        return self.gate.describe()

    def _disk_changed(self, low: bool) -> None:
        self.worker.brakes.disk_low = low
        self.intake.paused = low
        if not low:
            self.worker.wake()

    def request_stop(self) -> None:
        """Signal handler body: only set the flag."""
        self.stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply what can be, name what needs a restart."""
        assert self.reload_settings is not None
        try:
            new = self.reload_settings()
            key = resolve_api_key(self.settings.hub)
        except ConfigError as exc:
            log.error(
                "configuration reload failed; the running configuration stays", error=exc.message
            )
            return
        applied, restart = split_reload(changed_settings(self.settings, new))
        configure(new.log_level, new.log_format)
        self.client.set_api_key(key)
        log.info("configuration reloaded; the API key was read again", applied=applied)
        if restart:
            log.warning(
                "some changed settings take effect only after a restart",
                settings=restart,
                fix="systemctl restart ldx-hotfolder (or restart the container)",
            )

    def liveness(self) -> Liveness:
        """Which parts are alive: the watcher thread, the intake and worker loops."""

        def running(name: str) -> bool:
            task = self.tasks.get(name)
            return task is not None and not task.done()

        closure = self.gate.closure
        return Liveness(
            watcher=self.watcher is not None and self.watcher.healthy(),
            intake=running("intake"),
            pipeline=running("pipeline"),
            paused=None if closure is None or closure.hold is Hold.DOWN else closure.reason,
            holding_back=self.worker.holding_back() or self.gate.describe(),
            in_flight=len(self.worker.active),
        )

    # -- running -----------------------------------------------------------------------

    async def run(self) -> Outcome | None:
        """Run until stopped (``run``) or until quiet (``once``)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        log.info(
            "starting",
            mode="once" if self.once else "run",
            inbox=str(self.settings.inbox),
            outbox=str(self.settings.outbox),
            hub=self.settings.hub.base_url,
            sqlite=sqlite3.sqlite_version,
            instance=self.settings.instance_id,
        )
        for note in self.settings.notes:
            log.warning(note)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._close()

    async def _register(self) -> None:
        """Enter this instance in the shared table; ConfigError when a live instance
        already runs under the same id."""
        me, host, pid, now = (
            self.settings.instance_id,
            socket.gethostname(),
            os.getpid(),
            time.time(),
        )
        store = self.writer.store
        existing = await self.writer.call(store.instance, me)
        problem = instance_conflict(existing, host, pid, now, self.settings.lease_seconds)
        if problem is not None:
            raise ConfigError(problem)
        await self.writer.call(store.register_instance, me, host, pid, now)

    async def _check_routes(self) -> None:
        """Check [hub] and the rules against the hub's engine list; ConfigError if wrong."""
        try:
            engines = await asyncio.wait_for(self.client.engines(), 30)
        except (LdxError, TimeoutError) as exc:
            why = exc.message if isinstance(exc, LdxError) else "no answer within 30 s"
            log.warning("cannot check the settings against the hub now", error=why)
            return
        if not engines:
            log.warning(
                "the hub's engine list is empty or unreadable; running with the configured "
                "engine, language and format, and the hub's answer to each job decides"
            )
            return
        offer = offer_from_engines(engines)
        router = self.intake.router
        problems = check_rules(self.settings.rules, router.defaults, offer)
        if problems:
            raise ConfigError("the hub does not offer what is configured: " + "; ".join(problems))
        router.offer = offer

    async def _refresh_engines(self) -> None:
        """Keep the cached engine list (used for folder files) fresh while running."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), ENGINES_REFRESH_SECONDS)
            if self.stop.is_set():
                return
            try:
                engines = await self.client.engines()
            except LdxError as exc:
                log.warning("cannot refresh the hub's engine list", error=exc.message)
                continue
            if engines:
                self.intake.router.offer = offer_from_engines(engines)

    async def _run(self) -> Outcome | None:
        await self._register()
        await self.pages.refresh()
        await self._check_routes()
        outbox_root = self.settings.outbox.absolute()
        await asyncio.to_thread(
            reconcile.sweep, outbox_root, self.settings.instance_id, time.time()
        )
        self.disk.check()
        for warning in stale_size_warnings_for(self.settings.inbox, self.settings.quiet_period):
            log.warning("the quiet period is shorter than the share's attribute cache", why=warning)
        await self.intake.load_known()
        if not self.once:
            self.watcher = self._watch(asyncio.get_running_loop())
        found = await self.intake.scan()
        log.info("start-up scan done", new_files=found, known=len(self.intake.known))
        self.ready.set()
        tasks = self._start_tasks()
        if self.supervisor is not None:
            tasks += await self.supervisor.start(self.stop)
        await self.stop.wait()
        if self.supervisor is not None:
            self.supervisor.stopping()
        await self.worker.shutdown(STOP_GRACE_SECONDS)
        if self.worker.hooks is not None:
            await self.worker.hooks.drain(STOP_GRACE_SECONDS)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._save_durations()
        log.info("stopped")
        return await self._outcome() if self.once else None

    def _watch(self, loop: asyncio.AbstractEventLoop) -> Watcher:
        """Start the watcher that feeds intake; it supervises itself."""
        watcher = Watcher(
            self.settings.inbox.absolute(),
            self.intake.hint,
            polling=self.settings.use_polling,
            polling_interval=self.settings.polling_interval,
            on_overflow=self._overflowed,
        )
        watcher.start(loop)
        self.intake.after_rescan.append(lambda: watcher.check_coverage(self.intake.request_rescan))
        return watcher

    def _overflowed(self) -> None:
        log.warning("filesystem events were lost (inotify queue overflow); rescanning")
        self.intake.request_rescan()

    def _start_tasks(self) -> list[asyncio.Task[None]]:
        stop = self.stop
        tasks = [
            asyncio.create_task(self.intake.run(stop), name="intake"),
            asyncio.create_task(self.worker.run(stop), name="pipeline"),
            asyncio.create_task(self.worker.keep_leases(stop), name="leases"),
            asyncio.create_task(self.poller.run(), name="poller"),
            asyncio.create_task(self.disk.run(stop), name="diskspace"),
            asyncio.create_task(self._refresh_engines(), name="engines"),
            asyncio.create_task(self._keep_durations(), name="durations"),
        ]
        if self.watcher is not None:
            watcher = self.watcher
            keep = watcher.keep_alive(stop, self.intake.request_rescan)
            tasks.append(asyncio.create_task(keep, name="watcher"))
        self.tasks = {task.get_name(): task for task in tasks}
        if self.once:
            tasks.append(asyncio.create_task(self._stop_when_quiet(), name="once"))
        if self.progress:
            bar = follow(self.views, self.started_at, ProgressBar())
            tasks.append(asyncio.create_task(bar, name="progress"))
        return tasks

    async def _keep_durations(self) -> None:
        """Write what the poll scheduler learned about job durations, now and then."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), DURATIONS_SAVE_SECONDS)
            await self._save_durations()

    async def _save_durations(self) -> None:
        durations = self.poller.durations
        if not durations.changed:
            return
        durations.changed = False
        for engine, per_page in durations.per_page.items():
            with contextlib.suppress(LdxError):
                await self.writer.call(
                    self.writer.store.save_duration, engine, per_page, 0.0, 1, time.time()
                )

    async def _stop_when_quiet(self) -> None:
        held_since: float | None = None
        while not self.stop.is_set():
            quiet = not self.intake.sightings and await self.worker.idle()
            closure = self.gate.closure
            if closure is not None and closure.hold is Hold.KEY:
                self.stop.set()  # ``once`` cannot wait for a person to fix the key
                return
            held = closure is not None or self.worker.holding_back() is not None
            held_since = (held_since or time.monotonic()) if held else None
            if quiet or (held_since is not None and time.monotonic() - held_since > self.max_wait):
                self.stop.set()
                return
            await asyncio.sleep(0.1)

    async def _outcome(self) -> Outcome:
        closure = self.gate.closure
        outcome = Outcome(
            auth_rejected=closure.reason if closure and closure.hold is Hold.KEY else None,
            held=self.worker.holding_back() or self.gate.describe(),
        )
        for path in sorted(self.intake.present):
            job = await asyncio.to_thread(self.views.latest_for_path, path)
            if job is not None and job.status is Status.COMPLETED:
                outcome.completed.append(path)
            elif job is not None and job.status is Status.FAILED:
                outcome.failed.append(path)
            else:
                outcome.unfinished.append(path)
        return outcome

    async def _close(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.close()
        if self.watcher is not None:
            self.watcher.stop()
        await self.gate.aclose()
        await self.client.aclose()
        self.writer.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def instance_conflict(
    existing: Instance | None,
    host: str,
    pid: int,
    now: float,
    lease: float,
    *,
    alive: Callable[[int], bool] = _pid_alive,
) -> str | None:
    """Why this daemon must not start under ``existing``'s id, or None.

    An instance seen within one lease, on another host or as another live process of
    this host, would hold the same jobs as this one; an older row, or one that stopped
    cleanly, is this instance's own earlier run (a crash or a restart).
    """
    if existing is None or existing.stopped_at is not None or now - existing.seen_at > lease:
        return None  # never there, stopped cleanly, or dead for a lease
    if existing.host == host and (existing.pid == pid or not alive(existing.pid)):
        return None
    where = f"pid {existing.pid} on {existing.host}"
    return (
        f"another instance runs under instance_id {existing.id!r} ({where}, seen "
        f"{now - existing.seen_at:.0f} s ago); give each instance its own instance_id"
    )


def _open_store(settings: Settings) -> Store:
    """The state database, checked and at this version's schema."""
    # An SQLite file belongs to this one daemon, which upgrades its schema itself; a
    # shared database is upgraded by the operator (``db upgrade``).
    url = settings.database_url
    store = Store(url, upgrade=url.startswith("sqlite"))
    if not store.integrity_ok():
        store.close()
        raise StateDamaged(damaged_message(settings.state_db, "it fails its integrity check"))
    return store


def _hub_client(settings: Settings, api_key: str, gate: Gate) -> HubClient:
    """The hub client, with room in its pool for every job in flight and a few lookups,
    its request budget and the gate that holds work while the hub cannot take it."""
    hub = settings.hub
    return HubClient.connect(
        hub.base_url,
        api_key,
        timeout=hub.timeout + hub.poll_wait,
        max_connections=settings.max_in_flight + 8,
        limits=Limits(deadline=hub.deadline, min_transfer_rate=hub.min_transfer_rate),
        budget=RequestBudget(hub.max_requests_per_minute),
        gate=gate,
        key_source=lambda: resolve_api_key(settings.hub),
    )


async def run_service(
    settings: Settings,
    *,
    once: bool,
    progress: bool = False,
    max_wait: float = DEFAULT_MAX_WAIT,
    reload_settings: Callable[[], Settings] | None = None,
) -> Outcome | None:
    """Prepare and run one service; ConfigError when the setup is wrong.

    Raises ``Unhealthy`` when a daemon stopped itself because a part of it died.
    """
    umask_before = tighten_umask()
    try:
        key = prepare(settings)
        failpoints.configure(failpoint_spec())
        service = Service(
            settings,
            key,
            once=once,
            progress=progress,
            max_wait=max_wait,
            reload_settings=reload_settings,
        )
        outcome = await service.run()
    finally:
        os.umask(umask_before)  # for a caller that goes on (tests, the demo)
    if service.supervisor is not None and service.supervisor.failure is not None:
        raise Unhealthy(service.supervisor.failure)
    return outcome
