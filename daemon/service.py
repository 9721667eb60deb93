"""Service: wire the parts together and run them (``run`` forever, ``once`` to quiet).

Opens the store and checks it, builds the hub client, intake, watcher and worker, runs
the start-up scan, then runs until SIGTERM/SIGINT (``run``) or until every file in the
inbox has a final job (``once``). Signal handlers only set a flag; the loops notice it,
stop taking new work, give running steps a bounded time to reach a safe point, and exit.
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
from pathlib import Path

from daemon.config import Settings, check_folders, failpoint_spec, resolve_api_key
from daemon.errors import ConfigError, LdxError
from daemon.hub.client import Hub, HubClient
from daemon.hub.transfer_child import ClientConfig
from daemon.hub.transfers import TransferProcess
from daemon.inbox.intake import Intake
from daemon.inbox.mounts import remote_storage_for, stale_size_warnings_for
from daemon.inbox.routing import check_rules, offer_from_engines
from daemon.inbox.watcher import Watcher
from daemon.jobs.offload import Offload
from daemon.jobs.store import Instance, StateDamaged, Status, Store, damaged_message
from daemon.jobs.writer import Db
from daemon.logs import get_logger
from daemon.ops import failpoints, metrics
from daemon.ops.diskspace import DiskMonitor
from daemon.ops.health import Liveness
from daemon.ops.progress import ProgressBar, follow
from daemon.ops.supervise import Supervisor, Unhealthy
from daemon.outbox import reconcile
from daemon.outbox.permissions import OutputPermissions, tighten_umask
from daemon.outbox.permissions import check as check_permissions
from daemon.pipeline.hooks import Hooks
from daemon.pipeline.worker import Pipeline

log = get_logger(component="service")
ENGINES_REFRESH_SECONDS = 3600.0  # the engine list checks folder files between restarts
STOP_GRACE_SECONDS = 10.0  # uploads and downloads in progress get this long to finish


@dataclass
class Outcome:
    """What a ``once`` run did: paths per final status."""

    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    auth_rejected: str | None = None

    @property
    def exit_code(self) -> int:
        """0 when every file completed, 1 when any did not, 2 when the key was rejected."""
        if self.auth_rejected is not None:
            return 2
        return 1 if self.failed or self.unfinished else 0


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
    db_path = settings.database_url.removeprefix("sqlite:///")
    if db_path != settings.database_url:
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    return key


class Service:
    """One daemon: store, client, intake, worker and (for ``run``) the watcher."""

    def __init__(
        self,
        settings: Settings,
        api_key: str,
        *,
        once: bool,
        progress: bool = False,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.once = once
        self.progress = progress
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.started_at = time.time()
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once the watcher runs and the start-up scan is done
        metrics.set_instance(settings.instance_id)
        store = _open_store(settings)
        offload = _offload_for(settings)
        # A local SQLite commit is short enough for the event loop; a server's round trips
        # are not (daemon/offload.py).
        self.db = Db(store, offload if store.engine.dialect.name == "sqlite" else None)
        self.client = _hub_client(settings, api_key)
        self.pipeline = Pipeline(
            settings,
            self.db,
            self.client,
            key_source=lambda: resolve_api_key(settings.hub),
            offload=offload,
        )
        self.intake = Intake(settings, self.db, self.pipeline.wake, reject_empty=once)
        self.pipeline.on_input_changed = self.intake.forget
        self.disk = DiskMonitor(
            [settings.outbox.absolute(), _state_folder(settings)],
            settings.min_free_space_mb,
            self._disk_changed,
        )
        self.pipeline.on_disk_full = self.disk.check_now
        self.pipeline.hooks = Hooks(settings.hooks, self._hook_failed)
        self.watcher: Watcher | None = None
        self.supervisor = (
            None
            if once
            else Supervisor(settings, self.db, self.liveness, self.client, reload_settings)
        )

    def _hook_failed(self, job_id: int, message: str) -> None:
        record = self.db.call(self.db.store.record_hook_error, job_id, message)
        asyncio.get_running_loop().create_task(record)

    async def _check_routes(self) -> None:
        """Check [hub] and the rules against the hub's engine list; ConfigError if wrong."""
        try:
            engines = await self.client.engines()
        except LdxError as exc:
            log.warning("cannot check the settings against the hub now", error=exc.message)
            return
        offer = offer_from_engines(engines)
        problems = check_rules(self.settings.rules, self.intake.router.defaults, offer)
        if problems:
            raise ConfigError("the hub does not offer what is configured: " + "; ".join(problems))
        self.intake.router.offer = offer

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
            self.intake.router.offer = offer_from_engines(engines)

    def _disk_changed(self, low: bool) -> None:
        self.pipeline.disk_low = low
        self.intake.paused = low
        if not low:
            self.pipeline.wake()

    def request_stop(self) -> None:
        """Signal handler body: only set the flag."""
        self.stop.set()

    def liveness(self) -> Liveness:
        """Which parts are alive: the watcher thread, the intake and pipeline loops."""

        def running(name: str) -> bool:
            task = self.tasks.get(name)
            return task is not None and not task.done()

        return Liveness(
            watcher=self.watcher is not None and self.watcher.alive(),
            intake=running("intake"),
            pipeline=running("pipeline"),
            paused=self.pipeline.paused,
            holding_back=self.pipeline.holding_back(),
            in_flight=len(self.pipeline.active),
        )

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
        try:
            return await self._run(loop)
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
        store = self.db.store
        existing = await self.db.call(store.instance, me)
        problem = instance_conflict(existing, host, pid, now, self.settings.lease_seconds)
        if problem is not None:
            raise ConfigError(problem)
        await self.db.call(store.register_instance, me, host, pid, now)

    async def _run(self, loop: asyncio.AbstractEventLoop) -> Outcome | None:
        await self._register()
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
            self.watcher = self.intake.watch(loop)  # inotify and/or polling, supervised
        found = await self.intake.scan()
        log.info("start-up scan done", new_files=found, known=len(self.intake.known))
        self.ready.set()
        tasks = [
            asyncio.create_task(self.intake.run(self.stop), name="intake"),
            asyncio.create_task(self.pipeline.run(self.stop), name="pipeline"),
            asyncio.create_task(self.pipeline.keep_leases(self.stop), name="leases"),
            asyncio.create_task(self.disk.run(self.stop), name="diskspace"),
            asyncio.create_task(self._refresh_engines(), name="engines"),
        ]
        self.tasks = {task.get_name(): task for task in tasks}
        if self.supervisor is not None:
            tasks += await self.supervisor.start(self.stop)
        if self.once:
            tasks.append(asyncio.create_task(self._stop_when_quiet(), name="once"))
        if self.progress:
            bar = follow(self.db, self.started_at, ProgressBar())
            tasks.append(asyncio.create_task(bar, name="progress"))
        await self.stop.wait()
        if self.supervisor is not None:
            self.supervisor.stopping()
        await self.pipeline.shutdown(STOP_GRACE_SECONDS)
        if self.pipeline.hooks is not None:
            await self.pipeline.hooks.drain(STOP_GRACE_SECONDS)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("stopped")
        return await self._outcome() if self.once else None

    async def _stop_when_quiet(self) -> None:
        while not self.stop.is_set():
            # ``once`` cannot wait for a person to fix the key: it reports and ends.
            quiet = not self.intake.sightings and await self.pipeline.idle()
            if quiet or self.pipeline.paused is not None:
                self.stop.set()
                return
            await asyncio.sleep(0.1)

    async def _outcome(self) -> Outcome:
        outcome = Outcome(auth_rejected=self.pipeline.paused)
        for path in sorted(self.intake.present):
            job = await self.db.call(self.db.store.latest_for_path, path)
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
        await self.client.aclose()
        self.db.close()


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


def _hub_client(settings: Settings, api_key: str) -> Hub:
    """The hub client, with room in its pool for every job in flight and a few lookups;
    in a child process of its own when ``transfer_process`` asks for it."""
    hub = settings.hub
    config = ClientConfig(
        hub.base_url,
        api_key,
        timeout=hub.timeout + hub.poll_wait,
        deadline=hub.deadline,
        min_transfer_rate=hub.min_transfer_rate,
        max_connections=settings.max_in_flight + 8,
    )
    if use_transfer_process(settings.transfer_process, len(os.sched_getaffinity(0))):
        return HubClient.over(TransferProcess(config))
    return HubClient.over(config.api())


def use_transfer_process(setting: bool | str, cores: int) -> bool:
    """Whether the HTTP work runs in a child: asked for, or "auto" with 2 or more cores."""
    return setting if isinstance(setting, bool) else cores >= 2


def _offload_for(settings: Settings) -> Offload:
    """Inline work unless a folder the daemon reads or writes is on network storage."""
    folders = [settings.inbox, settings.outbox, _state_folder(settings)]
    if settings.archive_dir is not None:
        folders.append(settings.archive_dir)
    remote = remote_storage_for([folder.absolute() for folder in folders])
    if remote:
        log.info("folders on network storage: file and state work runs in threads", mounts=remote)
    return Offload(allowed=not remote)


def _state_folder(settings: Settings) -> Path:
    url = settings.database_url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).parent
    return settings.outbox.absolute()


async def run_service(
    settings: Settings,
    *,
    once: bool,
    progress: bool = False,
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
            settings, key, once=once, progress=progress, reload_settings=reload_settings
        )
        outcome = await service.run()
    finally:
        os.umask(umask_before)  # for a caller that goes on (tests, the demo)
    if service.supervisor is not None and service.supervisor.failure is not None:
        raise Unhealthy(service.supervisor.failure)
    return outcome
