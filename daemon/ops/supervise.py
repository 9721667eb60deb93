"""Supervision of a running daemon: systemd, health, metrics, deadman and reload.

For ``run`` only (``once`` is watched by the person who started it). Once the start-up
scan is done the service hands over here: ``READY=1`` goes to systemd, the health
``Monitor`` starts beating (watchdog, ``STATUS=``, heartbeat, queue gauges), the health
socket answers ``health`` and ``status``, the metrics endpoint opens when configured, the
``Deadman`` thread watches the event loop, and SIGHUP asks the service to re-read its
configuration. The SIGHUP handler only sets a flag; the reload runs on the loop, and a
reload that fails in any way is logged and leaves the reloader waiting for the next one.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from daemon.errors import ConfigError
from daemon.logs import get_logger
from daemon.ops.health import Deadman, Monitor, status_line
from daemon.ops.healthsock import HealthSocket
from daemon.ops.metrics import MetricsServer
from daemon.ops.notify import Notifier

log = get_logger(component="supervise")
# A stuck event loop kills the process only after this long at least: a busy machine
# (or a debugger) may pause the loop for a few seconds without anything being wrong.
DEADMAN_FLOOR = 30.0


class Supervisor:
    """Everything that watches and reports on a running daemon."""

    def __init__(
        self,
        monitor: Monitor,
        notifier: Notifier,
        *,
        metrics_address: tuple[str, int] | None = None,
        reload: Callable[[], None] | None = None,
        answer: HealthSocket | None = None,
    ) -> None:
        """``metrics_address``: (host, port) of ``/metrics``, None for no endpoint;
        ``reload``: what SIGHUP does (None: it is ignored, with a line saying so);
        ``answer``: the health socket, started once the first beat is taken."""
        self.monitor = monitor
        self.notifier = notifier
        self.metrics_address = metrics_address
        self.reload = reload
        self.answer = answer
        deadline = max(monitor.stall_timeout, DEADMAN_FLOOR)
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
        if self.answer is not None:
            self.answer.start()  # a path taken by another daemon is a configuration error
        self.notifier.ready(status_line(beat, beat.time))
        self.deadman.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        log.info("ready", notify=self.notifier.enabled)
        return [
            asyncio.create_task(self.monitor.run(stop), name="monitor"),
            asyncio.create_task(self._reloader(stop), name="reload"),
        ]

    def _start_metrics(self) -> None:
        if self.metrics_address is None:
            return
        host, port = self.metrics_address
        try:
            self.metrics = MetricsServer(host, port, self.monitor.healthz)
        except OSError as exc:
            raise ConfigError(
                f"metrics_port: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        self.metrics.start()
        bound_host, bound = self.metrics.address
        log.info("metrics endpoint listening", url=f"http://{bound_host}:{bound}/metrics")

    async def _reloader(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._reload.wait()
            self._reload.clear()
            self.notifier.reloading()
            if self.reload is None:
                log.warning("SIGHUP ignored: this daemon was not started from a configuration file")
            else:
                self._reload_once(self.reload)
            beat = self.monitor.latest
            if beat is not None:
                self.notifier.ready(status_line(beat, beat.time))

    @staticmethod
    def _reload_once(reload: Callable[[], None]) -> None:
        # One failed reload must never end the reloader: later SIGHUPs would do nothing.
        try:
            reload()
        except Exception as exc:
            log.error(
                "configuration reload failed; the running configuration stays",
                error=f"{type(exc).__name__}: {exc}",
            )

    def stopping(self) -> None:
        """Tell systemd the daemon is stopping; the loop stops beating, so the deadman too."""
        self.deadman.stop()
        self.notifier.stopping()

    async def close(self) -> None:
        """Stop watching: signal handler, metrics endpoint, health socket, deadman,
        health monitor."""
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.deadman.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.answer is not None:
            self.answer.close()
        await self.monitor.close()
