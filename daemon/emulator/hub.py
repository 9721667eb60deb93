"""The LDX hub emulator's logic, independent of HTTP: the ``Hub`` facade over its parts.

``Hub`` is what the HTTP layer, the tests and the CLI hold. It composes the parts, each
in its own module:

- ``files.FileStore``: every file on disk in the directory it is given (uploads, upload
  sessions, job outputs), downloads, pre-signed storage tokens and expiry;
- ``jobs.Jobs``: RenderOCR jobs as a state machine computed lazily from the ``Clock``
  (no background threads), settled into outputs in the store;
- ``gateway.Gateway``: API keys, the runtime knobs (``knobs.py``), rate windows, outages,
  refused routes and injected faults, drawn from seeded ``random.Random`` streams (one
  per client job, so that a run's luck does not depend on how the clients' requests
  interleave);
- ``ledger.Ledger``: what it received, for tests to read, including what the real hub
  would bill (one paid conversion of ``input_pages`` per job created; ``pages_billed``,
  ``paid_conversions``).

It is thread-safe: the HTTP layer calls it from worker threads while tests read the
ledger from theirs. The names other modules import from here (settings, records,
refusals, ledger sums) are re-exported, so ``daemon.emulator.hub`` stays the one import.

Facts come from the fact sheet ``shared/ldxhub-api.md``; where it is silent, comments say
what a real gateway (Zuplo in front of a backend) most likely does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.emulator.clock import Clock
from daemon.emulator.documents import render_document
from daemon.emulator.engine import ENGINE_ID, INPUT_FORMATS, LANGUAGES, engines
from daemon.emulator.files import MEDIA_TYPES, FileStore, IncomingFile, StorageTokens
from daemon.emulator.gateway import Access, Fault, Gateway, bearer_key
from daemon.emulator.inspection import Inspection, inspect_file
from daemon.emulator.jobs import UPSTREAM_ERROR_MESSAGE, Jobs, Renderer
from daemon.emulator.knobs import Faults, Knobs, Storage, Variants
from daemon.emulator.ledger import (
    FAULT_KINDS,
    Ledger,
    pages_billed,
    paid_conversions,
    refused_share,
)
from daemon.emulator.models import (
    Download,
    FileInfo,
    JobError,
    JobInfo,
    Stamp,
    clean_filename,
    hostile_id,
    iso,
    new_id,
)
from daemon.emulator.refusals import (
    Expired,
    HubError,
    InvalidRequest,
    MissingInput,
    NotFound,
    PayloadTooLarge,
)
from daemon.emulator.settings import (
    DEFAULT_API_KEY,
    FILE_TTL_SECONDS,
    JOB_TTL_SECONDS,
    MAX_CHUNK_BYTES,
    MAX_UPLOAD_BYTES,
    HubSettings,
)

__all__ = [
    "DEFAULT_API_KEY",
    "ENGINE_ID",
    "FAULT_KINDS",
    "FILE_TTL_SECONDS",
    "INPUT_FORMATS",
    "JOB_TTL_SECONDS",
    "LANGUAGES",
    "MAX_CHUNK_BYTES",
    "MAX_UPLOAD_BYTES",
    "MEDIA_TYPES",
    "UPSTREAM_ERROR_MESSAGE",
    "Access",
    "Download",
    "Expired",
    "Fault",
    "Faults",
    "FileInfo",
    "Hub",
    "HubError",
    "HubSettings",
    "IncomingFile",
    "Inspection",
    "InvalidRequest",
    "JobError",
    "JobInfo",
    "Knobs",
    "MissingInput",
    "NotFound",
    "PayloadTooLarge",
    "Renderer",
    "Stamp",
    "Storage",
    "Variants",
    "bearer_key",
    "clean_filename",
    "hostile_id",
    "inspect_file",
    "iso",
    "new_id",
    "pages_billed",
    "paid_conversions",
    "refused_share",
]


class Hub:
    """The emulated LDX hub: file store, upload sessions, RenderOCR jobs, faults, ledger.

    Every method hands over to one part. Two kinds of lock keep it thread-safe: the
    store's lock guards files and jobs (and may be held while a file is written or a
    document rendered); the gateway's and the storage tokens' locks are only ever held
    briefly, so the HTTP layer may call the fault and auth methods straight from its
    event loop.
    """

    def __init__(
        self,
        data_dir: Path | str,
        settings: HubSettings | None = None,
        *,
        clock: Clock | None = None,
        renderer: Renderer | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings = settings or HubSettings()
        self.clock = clock = clock or Clock()
        self._ledger = Ledger()
        self._gateway = Gateway(settings, clock, self._ledger)
        self._files = FileStore(self.data_dir, settings, clock, self._ledger, self._knobs_now)
        self._tokens = StorageTokens(clock)
        self._jobs = Jobs(
            self._files,
            self._gateway,
            settings=settings,
            clock=clock,
            ledger=self._ledger,
            renderer=renderer or render_document,
        )

    def _knobs_now(self) -> Knobs:
        return self._gateway.knobs

    # -- auth ---------------------------------------------------------------------------

    def check_key(self, authorization: str | None) -> Access:
        """Judge an Authorization header against the known and revoked keys."""
        return self._gateway.check_key(authorization)

    def set_keys(
        self, api_keys: Iterable[str] | None = None, revoked: Iterable[str] | None = None
    ) -> dict[str, list[str]]:
        """Replace the valid and/or revoked keys; return both lists."""
        return self._gateway.set_keys(api_keys, revoked)

    # -- knobs --------------------------------------------------------------------------

    @property
    def knobs(self) -> Knobs:
        """Every knob in force (read without a lock: ``Knobs`` is replaced whole)."""
        return self._gateway.knobs

    @property
    def faults(self) -> Faults:
        """The request-fault knobs in force."""
        return self._gateway.knobs.faults

    def update_knobs(self, changes: Mapping[str, object]) -> Knobs:
        """Change any knobs, all or none (ValueError names a bad one); return them all.

        Setting ``outage`` to a number starts that many seconds of outage now.
        """
        return self._gateway.update_knobs(changes)

    def update_faults(self, changes: Mapping[str, object]) -> Faults:
        """``update_knobs``, returning the request-fault knobs (the older interface)."""
        return self.update_knobs(changes).faults

    def reset_knobs(self) -> Knobs:
        """Put every knob back to how the hub was built."""
        return self._gateway.reset_knobs()

    # -- faults and gateway policies ----------------------------------------------------

    def draw_fault(self, stream: str | None = None) -> Fault | None:
        """Decide whether this request is dropped, answered 5xx or 429; count it.

        ``stream`` names the client job the request is for (its trace header)."""
        return self._gateway.draw_fault(stream)

    def take_stall(self) -> bool:
        """Use up one of the stalled downloads still to come; False when none is left."""
        return self._gateway.take_stall()

    def take_lost_reply(self, job_id: str) -> bool:
        """Whether the reply creating ``job_id`` is to be lost (``lose_create_replies``)."""
        return self._gateway.take_lost_reply(job_id)

    def take_create_drop(self, body: object) -> bool:
        """Whether a create request is to be cut before any job is made
        (``drop_create_requests``, or ``drop_create_after_failure`` for its filename)."""
        return self._gateway.take_create_drop(body, self._files.filename_of)

    def outage(self, public: bool = False) -> str | None:
        """The ``outage_mode`` if an outage is on for this request, else None; counted."""
        return self._gateway.outage(public)

    def refusal(self, route: str) -> int | None:
        """``refuse_status`` if ``route`` is the refused one (``refuse_route``), else None."""
        return self._gateway.refusal(route)

    def throttle(self, key: str) -> float | None:
        """Apply the per-key limit on /files; return Retry-After seconds when over it."""
        return self._gateway.throttle(key)

    def limit_requests(self, key: str) -> float | None:
        """Apply ``requests_per_minute`` (every authenticated route); Retry-After or None."""
        return self._gateway.limit_requests(key)

    # -- ledger -------------------------------------------------------------------------

    def count_request(self, route: str) -> None:
        """Count one request to ``route``, e.g. ``"GET /files/{file_id}"``."""
        self._ledger.count_request(route)

    def record_event(self, event: dict[str, Any]) -> None:
        """Log one authenticated-route request (time, route, trace header, answer)."""
        self._ledger.record_event(event)

    def record_download(
        self, file_id: str, size: int, status: int, mode: str | None = None
    ) -> None:
        """Note a download answer: the body size it announced (0: none), its status, and
        the ``mode`` of a body that is not the plain file (gzip, endless, ...)."""
        entry: dict[str, Any] = {"file_id": file_id, "size": size, "status": status}
        if mode is not None:
            entry["mode"] = mode
        self._ledger.record("downloads", entry)

    def count_refused(self, route: str) -> None:
        """Count one 429 answer to ``route`` (also counted as a request)."""
        self._ledger.count_refused(route)

    def count_storage_authorization(self) -> None:
        """Note a storage request that carried an Authorization header (a leaked key)."""
        self._ledger.count_storage_authorization()

    def ledger(self) -> dict[str, Any]:
        """Return a copy of the ledger (a JSON-ready dict).

        A job whose end has passed on the clock shows its outcome even if nobody has
        looked at it since (without settling it: reading the ledger never renders).
        """
        snapshot = self._ledger.snapshot()
        self._jobs.fill_outcomes(snapshot["jobs"], self.clock.now())
        return snapshot

    def reset_ledger(self) -> None:
        """Forget everything the ledger recorded."""
        self._ledger.reset()

    # -- files --------------------------------------------------------------------------

    def receive_file(self) -> IncomingFile:
        """Start receiving an upload; use the result as a context manager."""
        return self._files.receive_file()

    def add_file(self, filename: str, data: bytes, content_type: str | None = None) -> FileInfo:
        """Store ``data`` as an uploaded file (a shortcut for tests and demos)."""
        return self._files.add_file(filename, data, content_type)

    def create_upload_session(self, filename: str) -> FileInfo:
        """Create the empty file of an upload session (``POST /uploads``)."""
        return self._files.create_upload_session(filename)

    def append_upload(self, file_id: str, data: bytes) -> FileInfo:
        """Append a decoded chunk to an upload session (``PUT /uploads/{id}``)."""
        return self._files.append_upload(file_id, data)

    def list_files(self) -> list[FileInfo]:
        """Every live file, uploads and outputs alike, newest first."""
        return self._files.list_files()

    def get_file(self, file_id: str) -> FileInfo:
        """FileInfo of a live file; NotFound if unknown or expired."""
        return self._files.get_file(file_id)

    def file_size(self, file_id: str) -> int:
        """Bytes stored for ``file_id`` so far (0 when unknown); no expiry check."""
        return self._files.file_size(file_id)

    def hold_output(self, file_id: str) -> None:
        """NotFound for an output storage has not got yet (``output_delay``) or lost."""
        self._files.hold_output(file_id)

    def open_download(self, file_id: str) -> Download:
        """Where and how to stream a live file; NotFound if unknown or expired."""
        return self._files.open_download(file_id)

    def storage_token(self, file_id: str) -> str:
        """A short-lived token naming ``file_id`` on the storage route (a pre-signed URL)."""
        return self._tokens.issue(file_id)

    def resolve_storage_token(self, token: str) -> str | None:
        """The file_id a live storage token names, or None."""
        return self._tokens.resolve(token)

    # -- jobs ---------------------------------------------------------------------------

    def engines(self) -> list[dict[str, Any]]:
        """The body of ``GET /renderocr/engines`` under ``data``."""
        return engines()

    def create_job(self, body: object) -> JobInfo:
        """Validate a ``POST /renderocr/jobs`` body and queue the job (InvalidRequest)."""
        return self._jobs.create_job(body)

    def list_jobs(self) -> list[JobInfo]:
        """Every live job, newest first (no paging, as documented)."""
        return self._jobs.list_jobs()

    def get_job(self, job_id: str) -> JobInfo:
        """A job as it stands now; NotFound if unknown or expired."""
        return self._jobs.get_job(job_id)

    def job_terminal_at(self, job_id: str) -> datetime | None:
        """When a job reaches completed/failed on the clock (None if unknown), for long polls."""
        return self._jobs.job_terminal_at(job_id)
