"""Metrics: Prometheus counters and gauges, per-stage job timings, and the HTTP endpoint.

The metrics live in one registry of their own (``REGISTRY``). The worker reports what
happens at its existing points (a stage took so long, a step will be retried, a job
failed with this code, bytes went up or down); the monitor refreshes the queue gauges
from the state table. ``MetricsServer`` serves ``/metrics`` (Prometheus text format)
and ``/healthz`` from a background thread, on loopback unless configured otherwise; it
answers even when the event loop is stuck, and ``/healthz`` then says so. Every sample
carries the label ``instance_id`` (``set_instance``), so that the series of several
instances sharing one database stay apart whatever the scrape configuration.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import AF_INET6
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from daemon.jobs.model import Stage

REGISTRY = CollectorRegistry(auto_describe=True)
_NS = "ldx_hotfolder"

JOBS = Gauge(
    f"{_NS}_jobs", "Jobs in the state table, per public status", ["status"], registry=REGISTRY
)
OLDEST_WAITING = Gauge(
    f"{_NS}_oldest_waiting_age_seconds",
    "Age of the oldest job not yet final (queued or processing); 0 when none",
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(f"{_NS}_in_flight", "Jobs being driven right now", registry=REGISTRY)
PAUSED = Gauge(f"{_NS}_paused", "1 while work is paused (rejected API key)", registry=REGISTRY)
UP = Gauge(f"{_NS}_up", "1 while a component is alive", ["component"], registry=REGISTRY)
HEARTBEAT = Gauge(
    f"{_NS}_heartbeat_timestamp_seconds", "When the monitor last ran", registry=REGISTRY
)
STAGE_SECONDS = Histogram(
    f"{_NS}_stage_seconds",
    "Seconds one step of a job took, per stage",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
    registry=REGISTRY,
)
ERRORS = Counter(
    f"{_NS}_errors",
    "Errors by code (hub and local) and what was done: retry, fail or pause",
    ["code", "action"],
    registry=REGISTRY,
)
RETRIES = Counter(
    f"{_NS}_retries", "Steps deferred for a retry, per stage", ["stage"], registry=REGISTRY
)
FINISHED = Counter(
    f"{_NS}_jobs_finished", "Jobs that reached a final status", ["outcome"], registry=REGISTRY
)
UPLOADED_BYTES = Counter(f"{_NS}_uploaded_bytes", "Input bytes sent to the hub", registry=REGISTRY)
DOWNLOADED_BYTES = Counter(
    f"{_NS}_downloaded_bytes", "Output bytes fetched from the hub", registry=REGISTRY
)
PAGES_BILLED = Counter(
    f"{_NS}_pages_billed",
    "Pages the hub billed, per first folder below the inbox ((inbox): files right in it)",
    ["folder"],
    registry=REGISTRY,
)
BUDGET_PAGES = Gauge(
    f"{_NS}_budget_pages_used",
    "Pages billed (and at the hub) in the current UTC day or month",
    ["period"],
    registry=REGISTRY,
)
BUDGET_LIMIT = Gauge(
    f"{_NS}_budget_pages_limit",
    "The page budget of a UTC day or month ([budget]; 0: no limit)",
    ["period"],
    registry=REGISTRY,
)
BUDGET_HELD = Gauge(
    f"{_NS}_budget_held", "1 while the page budget holds new conversions", registry=REGISTRY
)
MAX_FOLDER_LABELS = 200  # folders beyond these many share the label "(other)"
_folder_labels: set[str] = set()

# What each stage's step does, as the name shown in metrics and job summaries.
STEP_NAMES = {
    Stage.PENDING: "upload",
    Stage.UPLOADING: "upload",
    Stage.UPLOADED: "submit",
    Stage.SUBMITTING: "submit",
    Stage.SUBMITTED: "convert",
    Stage.DOWNLOADING: "download",
    Stage.PUBLISHED: "finish",
}


def step_name(stage: Stage) -> str:
    """The name of the step that runs from ``stage``."""
    return STEP_NAMES.get(stage, stage.value)


# -- what the worker reports -----------------------------------------------------------

_current_timer: ContextVar[StageTimer | None] = ContextVar("ldx_stage_timer", default=None)


class StageTimer:
    """Adds up the seconds a job spends in each step, and observes them as metrics.

    Creating one makes it the current task's timer (a context variable), so a summary
    line logged anywhere down the job's task can show the stage times so far.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.seconds: dict[str, float] = {}
        self._running: tuple[str, float] | None = None  # the step timed now, since when
        _current_timer.set(self)

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        """Time the step that runs from ``stage``, whether it succeeds or raises."""
        self._running = (step_name(stage), self._clock())
        try:
            yield
        finally:
            self.switch(None)

    def switch(self, stage: Stage | None) -> None:
        """End the step timed now; go on timing the one of ``stage`` (a call that does
        several steps at once, like creating, following and fetching a job)."""
        now = self._clock()
        if self._running is not None:
            self.add(self._running[0], now - self._running[1])
        self._running = None if stage is None else (step_name(stage), now)

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` towards step ``name``."""
        seconds = max(0.0, seconds)
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        STAGE_SECONDS.labels(stage=name).observe(seconds)

    def summary(self) -> dict[str, float]:
        """Seconds per step, rounded, for the job's summary log line."""
        return {name: round(value, 3) for name, value in self.seconds.items()}


def switch_stage(stage: Stage) -> None:
    """Time what the current job task does from now on as the step of ``stage``."""
    timer = _current_timer.get()
    if timer is not None:
        timer.switch(stage)


def stage_summary() -> dict[str, float]:
    """The current job task's seconds per step so far (empty outside a job)."""
    timer = _current_timer.get()
    return timer.summary() if timer is not None else {}


def record_error(code: str, action: str, stage: Stage | None = None) -> None:
    """Count an error by code; ``action`` is retry, fail or pause."""
    ERRORS.labels(code=code, action=action).inc()
    if action == "retry" and stage is not None:
        RETRIES.labels(stage=step_name(stage)).inc()


def record_finished(outcome: str) -> None:
    """Count a job that reached ``completed`` or ``failed``."""
    FINISHED.labels(outcome=outcome).inc()


def record_uploaded(size: int) -> None:
    """Count bytes sent to the hub."""
    UPLOADED_BYTES.inc(max(0, size))


def record_downloaded(size: int) -> None:
    """Count bytes fetched from the hub."""
    DOWNLOADED_BYTES.inc(max(0, size))


def record_pages(folder: str, pages: int) -> None:
    """Count pages the hub billed for an input of ``folder`` (the first below the inbox)."""
    label = folder or "(inbox)"
    if label not in _folder_labels:
        if len(_folder_labels) >= MAX_FOLDER_LABELS:
            label = "(other)"
        else:
            _folder_labels.add(label)
    PAGES_BILLED.labels(folder=label).inc(max(0, pages))


def set_budget_limits(per_day: int | None, per_month: int | None) -> None:
    """Show the configured page budget (0: no limit)."""
    BUDGET_LIMIT.labels(period="day").set(per_day or 0)
    BUDGET_LIMIT.labels(period="month").set(per_month or 0)


def show_budget(today: int, month: int, held: bool) -> None:
    """Show the pages used today and this month, and whether the budget holds work."""
    BUDGET_PAGES.labels(period="day").set(today)
    BUDGET_PAGES.labels(period="month").set(month)
    BUDGET_HELD.set(1 if held else 0)


INSTANCE_LABEL = "instance_id"
_instance: str | None = None


def set_instance(instance_id: str | None) -> None:
    """Label every sample with this instance's id from now on (None: no label)."""
    global _instance  # noqa: PLW0603 - one process, one instance id
    _instance = instance_id


class _Labelled:
    """The registry's metrics with the instance label added to every sample."""

    def __init__(self, registry: CollectorRegistry, instance: str) -> None:
        self._registry = registry
        self._instance = instance

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                sample._replace(labels={**sample.labels, INSTANCE_LABEL: self._instance})
                for sample in family.samples
            ]
            yield labelled


def render() -> bytes:
    """The metrics in Prometheus text format."""
    if _instance is None:
        return generate_latest(REGISTRY)
    return generate_latest(_Labelled(REGISTRY, _instance))


# -- the HTTP endpoint -----------------------------------------------------------------

HealthSource = Callable[[], tuple[bool, dict[str, Any]]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = AF_INET6


def _handler(health: HealthSource) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "ldx-hotfolder"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, render())
            elif path == "/healthz":
                ok, body = health()
                data = json.dumps(body, ensure_ascii=False).encode("utf-8")
                self._reply(200 if ok else 503, "application/json", data)
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # no per-request lines, as for httpx

    return Handler


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP from a background thread."""

    def __init__(self, host: str, port: int, health: HealthSource) -> None:
        server_cls = _Server6 if ":" in host else _Server
        self._server = server_cls((host, port), _handler(health))
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> MetricsServer:
        """Serve in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
