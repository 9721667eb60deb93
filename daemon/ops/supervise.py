"""Supervision of a running daemon: systemd, health, metrics, deadman and reload.

For ``run`` only (``once`` is watched by the person who started it). Once the start-up
scan is done the service hands over here: ``READY=1`` goes to systemd, the health
``Monitor`` starts beating (watchdog, ``STATUS=``, heartbeat file, queue gauges), the
metrics endpoint opens when configured, the ``Deadman`` thread watches the event loop,
and SIGHUP re-reads the configuration. The SIGHUP handler only sets a flag; the reload
runs on the loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

from daemon.config import HubSettings, Settings, resolve_api_key, service_manager
from daemon.errors import ConfigError
from daemon.hub.client import Hub
from daemon.jobs.writer import Db
from daemon.logs import configure, get_logger
from daemon.ops.health import Deadman, Liveness, Monitor, status_line
from daemon.ops.metrics import MetricsServer
from daemon.ops.notify import Notifier, watchdog_interval

log = get_logger(component="supervise")
# Settings a SIGHUP applies at once (besides reading the API key again, from the file or
# credential the daemon started with); every other change waits for a restart.
RELOADABLE = frozenset({"log_level", "log_format"})
# A stuck event loop kills the process only after this long at least: a busy machine
# (or a debugger) may pause the loop for a few seconds without anything being wrong.
DEADMAN_FLOOR = 30.0


class Unhealthy(Exception):
    """The daemon stopped itself because a part of it stayed dead (exit 70)."""


def changed_settings(old: Settings, new: Settings) -> list[str]:
    """Names of the settings that differ (``hub.x`` for the hub table)."""
    changed = [
        name
        for name in Settings.model_fields
        if name != "hub" and getattr(old, name) != getattr(new, name)
    ]
    changed += [
        f"hub.{name}"
        for name in HubSettings.model_fields
        if getattr(old.hub, name) != getattr(new.hub, name)
    ]
    return changed


def split_reload(changed: list[str]) -> tuple[list[str], list[str]]:
    """(applied at once, needing a restart) among changed settings."""
    applied = [name for name in changed if name in RELOADABLE]
    return applied, [name for name in changed if name not in RELOADABLE]


class Supervisor:
    """Everything that watches and reports on a running daemon."""

    def __init__(
        self,
        settings: Settings,
        db: Db,
        liveness: Callable[[], Liveness],
        client: Hub,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.reload_settings = reload_settings
        manager = service_manager()
        self.notifier = Notifier(manager.notify_socket)
        self.monitor = Monitor(
            db,
            liveness,
            self.notifier,
            heartbeat_file=settings.heartbeat_path,
            interval=settings.heartbeat_interval,
            stall_timeout=settings.stall_timeout,
            watchdog_interval=watchdog_interval(
                manager.watchdog_usec, manager.watchdog_pid, os.getpid()
            ),
        )
        deadline = max(settings.stall_timeout, DEADMAN_FLOOR)
        self.deadman = Deadman(lambda: self.monitor.last_beat, deadline)
        self.metrics: MetricsServer | None = None
        self._reload = asyncio.Event()

    @property
    def failure(self) -> str | None:
        """Why the daemon stopped itself, or None."""
        return self.monitor.failure

    async def start(self, stop: asyncio.Event) -> list[asyncio.Task[None]]:
        """Tell systemd we are ready and start watching; return the tasks to cancel at stop."""
        self._start_metrics()  # first: a port in use is a configuration error, not READY
        await self.monitor.prime()
        beat = await self.monitor.beat()
        self.notifier.ready(status_line(beat, beat.time))
        self.deadman.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        log.info("ready", heartbeat=str(self.settings.heartbeat_path), notify=self.notifier.enabled)
        return [
            asyncio.create_task(self.monitor.run(stop), name="monitor"),
            asyncio.create_task(self._reloader(stop), name="reload"),
        ]

    def _start_metrics(self) -> None:
        port = self.settings.metrics_port
        if not port:
            return
        try:
            self.metrics = MetricsServer(self.settings.metrics_host, port, self.monitor.healthz)
        except OSError as exc:
            where = f"{self.settings.metrics_host}:{port}"
            raise ConfigError(f"metrics_port: cannot listen on {where}: {exc.strerror}") from None
        self.metrics.start()
        host, bound = self.metrics.address
        log.info("metrics endpoint listening", url=f"http://{host}:{bound}/metrics")

    async def _reloader(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._reload.wait()
            self._reload.clear()
            self.notifier.reloading()
            self.reload()
            beat = self.monitor.latest
            if beat is not None:
                self.notifier.ready(status_line(beat, beat.time))

    def reload(self) -> None:
        """Re-read the configuration; apply what can be applied, name what needs a restart."""
        if self.reload_settings is None:
            log.warning("SIGHUP ignored: this daemon was not started from a configuration file")
            return
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

    def stopping(self) -> None:
        """Tell systemd the daemon is stopping; the loop stops beating, so the deadman too."""
        self.deadman.stop()
        self.notifier.stopping()

    async def close(self) -> None:
        """Stop watching: signal handler, metrics endpoint, deadman, heartbeat file."""
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.deadman.stop()
        if self.metrics is not None:
            self.metrics.stop()
        await self.monitor.close()
