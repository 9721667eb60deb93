"""The LDX hub emulator's logic, independent of HTTP: files, uploads, jobs, faults, ledger.

``Hub`` keeps every file on disk in the directory it is given, runs RenderOCR jobs as a
state machine computed lazily from its ``Clock`` (no background threads), decides injected
faults with seeded ``random.Random`` streams (one per client job, so that a run's luck
does not depend on how the clients' requests interleave) and records what it received in
a ledger that tests read, including what the real hub would bill (one paid conversion of
``input_pages`` per job created; ``pages_billed``, ``paid_conversions``). Its runtime knobs
(``knobs.py``) change faults, storage behaviour and answer shapes while it runs. It is
thread-safe: the HTTP layer calls it from worker threads while tests read the ledger from
theirs.

Facts come from the fact sheet ``shared/ldxhub-api.md``; where it is silent, comments say
what a real gateway (Zuplo in front of a backend) most likely does.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import heapq
import itertools
import math
import os
import random
import re
import secrets
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, Literal, Protocol

from daemon.emulator import bombs
from daemon.emulator.clock import Clock
from daemon.emulator.documents import OUTPUT_FORMATS, render_document, write_package

# The knobs lived here before they got their own module: re-exported for importers.
from daemon.emulator.knobs import Faults as Faults  # noqa: PLC0414
from daemon.emulator.knobs import Knobs as Knobs  # noqa: PLC0414
from daemon.emulator.knobs import Storage as Storage  # noqa: PLC0414
from daemon.emulator.knobs import Variants as Variants  # noqa: PLC0414
from daemon.formats import SNIFF_BYTES, InputFormat, describe, sniff

# "200 MB" and "5 MB" are read as binary megabytes, the more lenient reading: a client
# that stays under 200 * 10**6 bytes is safe with either.
MAX_UPLOAD_BYTES = 200 * 1024 * 1024
MAX_CHUNK_BYTES = 5 * 1024 * 1024
FILE_TTL_SECONDS = 24 * 3600.0
JOB_TTL_SECONDS = 3 * 24 * 3600.0
DEFAULT_API_KEY = "demo-key"

ENGINE_ID = "ki/ocr"
INPUT_FORMATS = tuple(fmt.value for fmt in InputFormat)
# Only "Auto" and "jpn" are known; the rest are ISO 639-2/T codes in the same style.
LANGUAGES = (
    ("Auto", "Auto-detect"),
    ("jpn", "Japanese"),
    ("eng", "English"),
    ("zho", "Chinese"),
    ("kor", "Korean"),
    ("deu", "German"),
    ("fra", "French"),
    ("spa", "Spanish"),
)
UPSTREAM_ERROR_MESSAGE = (
    "An error occurred while communicating with an upstream service. Please try again later."
)
MEDIA_TYPES = {
    "pdf": "application/pdf",
    "tiff": "image/tiff",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "bmp": "image/bmp",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
}
FAULT_KINDS = (
    "error",
    "rate_limit",
    "drop",
    "stall",
    "job_failure",
    "throttle",
    "lost_reply",  # a job created, its reply cut (lose_create_replies)
    "dropped_create",  # a create cut before any job (drop_create_requests / _after_failure)
    "outage",
    "refused_route",
    "storage_lag",  # an output answered 404 (output_delay / output_missing)
)

_PROGRESS_STEPS = 10
_RATE_WINDOW = timedelta(minutes=1)
_MAX_EVENTS = 200_000
_MAX_GONE = 100_000  # expired ids remembered for a 410 (expired_status)
_STORAGE_TOKEN_TTL = timedelta(minutes=15)  # pre-signed storage URLs are short-lived
_MAX_STORAGE_TOKENS = 10_000
_PLAIN_ID = re.compile(r"[a-z0-9]{32}")


def new_id() -> str:
    """Return a fresh id in the hub's style: 32 lowercase alphanumerics."""
    # Hex digits are lowercase alphanumerics too; one call instead of 32 choices.
    return secrets.token_hex(16)


def hostile_id() -> str:
    """Return a fresh id with '..', '/' and '%' in it (the ``hostile_ids`` knob).

    The "%2F" in it is literal: a client that percent-encodes the id sends "%252F"; one
    that forgets the "%" sends "%2F", which the hub decodes to "/" and does not know.
    """
    return f"../../x%2F{secrets.token_hex(12)}"


def iso(moment: datetime) -> str:
    """Format an aware datetime the hub's way: ISO-8601 UTC, whole seconds, ``Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def clean_filename(name: str) -> str:
    """Keep only the last path component of a client-given name ("file" if none)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base or "file"


Stamp = Callable[[datetime], str]
"""Formats a moment for an answer body."""


def bearer_key(authorization: str | None) -> str | None:
    """Return the key of an ``Authorization: Bearer <key>`` header, or None."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


# ---------------------------------------------------------------------------------------
# Errors


class HubError(Exception):
    """A request the hub refuses; ``code`` and ``message`` go into the error body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NotFound(HubError):
    """The file, upload session or job does not exist (or has expired)."""


class InvalidRequest(HubError):
    """The request is malformed or names something the engine does not offer."""


class PayloadTooLarge(HubError):
    """An upload or chunk is over its size limit."""


class Expired(NotFound):
    """The file or job existed and has expired (404 or 410, per ``expired_status``)."""


class MissingInput(InvalidRequest):
    """A job names a file_id the hub does not have (status and code per Variants)."""


# ---------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class FileInfo:
    """The hub's FileInfo: metadata of one stored file."""

    file_id: str
    filename: str
    size: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime

    def to_json(self, stamp: Stamp = iso) -> dict[str, Any]:
        """Return the FileInfo body the API sends; ``stamp`` formats its times."""
        return {
            "file_id": self.file_id,
            "filename": self.filename,
            "size": self.size,
            "created_at": stamp(self.created_at),
            "updated_at": stamp(self.updated_at),
            "expires_at": stamp(self.expires_at),
        }


@dataclass(frozen=True)
class Download:
    """What the HTTP layer needs to stream a stored file."""

    file_id: str
    path: Path
    filename: str
    size: int
    media_type: str
    updated_at: datetime


@dataclass(frozen=True)
class JobError:
    """The JobError of a failed job."""

    code: str
    message: str
    request_id: str

    def to_json(self) -> dict[str, str]:
        """Return the ``error`` object of a failed job."""
        return {"code": self.code, "message": self.message, "request_id": self.request_id}


@dataclass(frozen=True)
class JobInfo:
    """A RenderOCR job as the API shows it at one instant."""

    job_id: str
    file_id: str
    engine: str
    status: Literal["queued", "processing", "completed", "failed"]
    progress: float
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    expires_at: datetime
    output_file_id: str | None = None
    error: JobError | None = None
    usage: int | None = None  # input pages billed, once known

    def to_json(self, stamp: Stamp = iso) -> dict[str, Any]:
        """Return the job body; ``output_file_id``/``error``/``usage`` only when they apply."""
        body: dict[str, Any] = {
            "job_id": self.job_id,
            "file_id": self.file_id,
            "engine": self.engine,
            "status": self.status,
            "progress": self.progress,
        }
        if self.output_file_id is not None:
            body["output_file_id"] = self.output_file_id
        if self.error is not None:
            body["error"] = self.error.to_json()
        if self.usage is not None:
            # Usage is documented with input_pages (fact sheet §7.3); billing per page makes
            # it likely on RenderOCR jobs, so completed jobs carry it unless told not to.
            body["usage"] = {"input_pages": self.usage}
        body["created_at"] = stamp(self.created_at)
        body["updated_at"] = stamp(self.updated_at)
        body["completed_at"] = None if self.completed_at is None else stamp(self.completed_at)
        body["expires_at"] = stamp(self.expires_at)
        return body


@dataclass(frozen=True)
class HubSettings:
    """How a ``Hub`` is built; the knobs in ``faults``, ``storage`` and ``variants`` can
    change later (``Hub.update_knobs``)."""

    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    revoked_keys: tuple[str, ...] = ()
    processing_time: float | tuple[float, float] = 3.0  # seconds, or a (min, max) range
    queue_delay: float = 0.0  # seconds a job stays queued
    output_size: int = 0  # outputs padded to at least this many bytes (benchmarks); 0 = off
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    file_ttl: float = FILE_TTL_SECONDS
    job_ttl: float = JOB_TTL_SECONDS
    seed: int | None = None
    faults: Faults = field(default_factory=Faults)
    storage: Storage = field(default_factory=Storage)
    variants: Variants = field(default_factory=Variants)

    def __post_init__(self) -> None:
        low, high = self.processing_range
        if not 0 <= low <= high:
            raise ValueError(f"processing_time must be >= 0 and min <= max, got {low}-{high}")
        if self.queue_delay < 0:
            raise ValueError("queue_delay must be >= 0")
        if self.output_size < 0:
            raise ValueError("output_size must be >= 0")
        if self.max_upload_bytes < 1 or self.max_chunk_bytes < 1:
            raise ValueError("upload limits must be positive")
        if self.file_ttl <= 0 or self.job_ttl <= 0:
            raise ValueError("retention times must be positive")

    @property
    def processing_range(self) -> tuple[float, float]:
        """Processing time as a (min, max) range; equal ends for a fixed time."""
        if isinstance(self.processing_time, tuple):
            return self.processing_time
        return (self.processing_time, self.processing_time)


class Access(enum.Enum):
    """The outcome of checking an Authorization header."""

    GRANTED = "granted"
    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Fault:
    """A fault drawn for one request."""

    kind: Literal["error", "rate_limit", "drop"]
    status: int = 0
    retry_after: float = 0.0


class Renderer(Protocol):
    """Builds an output document; ``daemon.emulator.documents.render_document`` by default."""

    def __call__(
        self,
        output_format: str,
        *,
        source_name: str,
        engine: str,
        language: str,
        pages: int,
        input_format: str,
    ) -> bytes: ...


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


# ---------------------------------------------------------------------------------------
# Content inspection: format, damage and page count, reading files in bounded pieces.


@dataclass(frozen=True)
class Inspection:
    """What the hub makes of an input file before converting it."""

    input_format: InputFormat | None
    pages: int
    problem: tuple[str, str] | None  # (error code, message) when the job must fail


_SCAN_CHUNK = 1024 * 1024
_SCAN_OVERLAP = 64
_PDF_MARKS = re.compile(rb"/Type\s*/Page\b|/ObjStm\b")


def inspect_file(path: Path) -> Inspection:
    """Sniff ``path``, check it is intact and count its pages."""
    with path.open("rb") as stream:
        head = stream.read(SNIFF_BYTES)
        fmt = sniff(head)
        if fmt is None:
            message = (
                "The input is not a PDF, TIFF, JPEG, PNG or BMP file; "
                f"it looks like {describe(head)}."
            )
            return Inspection(None, 0, ("unsupported_format", message))
        pages = _PAGE_COUNTERS[fmt](stream, os.fstat(stream.fileno()).st_size)
    if pages is None:
        message = f"The {fmt.value.upper()} file is damaged or truncated and cannot be read."
        return Inspection(fmt, 0, ("invalid_input", message))
    return Inspection(fmt, pages, None)


def _pdf_pages(stream: IO[bytes], size: int) -> int | None:
    """Count ``/Type /Page`` objects; None when there are none (a broken PDF)."""
    stream.seek(0)
    pages, object_streams, carry = 0, False, b""
    while True:
        chunk = stream.read(_SCAN_CHUNK)
        buffer = carry + chunk
        # Matches starting in the last bytes wait for the next chunk, which may extend them.
        cutoff = len(buffer) - _SCAN_OVERLAP if chunk else len(buffer)
        for match in _PDF_MARKS.finditer(buffer):
            if match.start() >= cutoff:
                break
            if match.group().endswith(b"ObjStm"):
                object_streams = True
            else:
                pages += 1
        if not chunk:
            break
        carry = buffer[max(cutoff, 0) :]
    if pages:
        return pages
    # PDF 1.5 object streams compress page objects out of sight: not broken, count unknown.
    return 1 if object_streams else None


def _tiff_pages(stream: IO[bytes], size: int) -> int | None:
    """Count the IFDs of a TIFF; None when one lies beyond the end of the file."""
    stream.seek(0)
    header = stream.read(8)
    if len(header) < 8:
        return None
    order = "<" if header[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", header[4:8])
    pages, seen = 0, set()
    while offset:
        if offset < 8 or offset in seen or offset + 2 > size:
            return None
        seen.add(offset)
        stream.seek(offset)
        (entries,) = struct.unpack(order + "H", stream.read(2))
        next_field = offset + 2 + 12 * entries
        if next_field + 4 > size:
            return None
        stream.seek(next_field)
        (offset,) = struct.unpack(order + "I", stream.read(4))
        pages += 1
    return pages or None


def _tail(stream: IO[bytes], size: int, length: int) -> bytes:
    stream.seek(max(0, size - length))
    return stream.read(length)


def _jpeg_pages(stream: IO[bytes], size: int) -> int | None:
    # Trailing padding after the end-of-image marker is common, so look near the end.
    return 1 if b"\xff\xd9" in _tail(stream, size, 1024) else None


def _png_pages(stream: IO[bytes], size: int) -> int | None:
    return 1 if b"IEND" in _tail(stream, size, 64) else None


def _bmp_pages(stream: IO[bytes], size: int) -> int | None:
    stream.seek(0)
    header = stream.read(14)
    if len(header) < 14:
        return None
    declared, pixels_at = struct.unpack("<I4xI", header[2:14])
    if size < declared or pixels_at > size:
        return None
    return 1


_PAGE_COUNTERS = {
    InputFormat.PDF: _pdf_pages,
    InputFormat.TIFF: _tiff_pages,
    InputFormat.JPEG: _jpeg_pages,
    InputFormat.PNG: _png_pages,
    InputFormat.BMP: _bmp_pages,
}


# ---------------------------------------------------------------------------------------
# Ledger


class _Ledger:
    """What the hub received, for tests to read; thread-safe.

    Besides what came in, it keeps what the hub would bill: every job created is one paid
    conversion of ``input_pages`` pages, whatever its outcome ("every conversion is a
    bill", fact sheet §14); and it tells refused requests (429) from answered ones.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._data = {
                "requests": {},
                "refused": {},  # route -> 429 answers (a subset of "requests")
                "uploads": [],
                "jobs": [],
                "downloads": [],
                "events": [],
                "faults": dict.fromkeys(FAULT_KINDS, 0),
                "storage_saw_authorization": 0,  # storage requests that carried the key
            }
            self._upload_index: dict[str, int] = {}  # file_id -> position in "uploads"
            self._job_index: dict[str, int] = {}  # job_id -> position in "jobs"

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._data)

    def count_request(self, route: str) -> None:
        with self._lock:
            requests = self._data["requests"]
            requests[route] = requests.get(route, 0) + 1

    def count_refused(self, route: str) -> None:
        with self._lock:
            refused = self._data["refused"]
            refused[route] = refused.get(route, 0) + 1

    def count_fault(self, kind: str) -> None:
        with self._lock:
            self._data["faults"][kind] += 1

    def count_storage_authorization(self) -> None:
        with self._lock:
            self._data["storage_saw_authorization"] += 1

    def record_upload(self, entry: dict[str, Any]) -> None:
        """Add an upload, or update the entry of the same file (a growing session)."""
        with self._lock:
            uploads: list[dict[str, Any]] = self._data["uploads"]
            index = self._upload_index.get(entry["file_id"])
            if index is not None:
                uploads[index] = entry
                return
            self._upload_index[entry["file_id"]] = len(uploads)
            uploads.append(entry)

    def record_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            events: list[dict[str, Any]] = self._data["events"]
            events.append(event)
            if len(events) > _MAX_EVENTS:  # a long-running emulator keeps the recent ones
                del events[: len(events) - _MAX_EVENTS]

    def record(self, kind: Literal["jobs", "downloads"], entry: dict[str, Any]) -> None:
        with self._lock:
            if kind == "jobs":
                self._job_index[entry["job_id"]] = len(self._data["jobs"])
            self._data[kind].append(entry)

    def update_job(self, job_id: str, **changes: Any) -> None:
        """Change fields of a job's entry (gone after a reset: nothing to do)."""
        with self._lock:
            index = self._job_index.get(job_id)
            if index is not None:
                self._data["jobs"][index].update(changes)


def paid_conversions(ledger: Mapping[str, Any]) -> int:
    """Conversions the hub would bill: one per job created."""
    return len(ledger["jobs"])


def pages_billed(ledger: Mapping[str, Any], filename: str | None = None) -> int:
    """Pages the hub would bill, in all or for one upload filename."""
    return sum(
        job["input_pages"]
        for job in ledger["jobs"]
        if filename is None or job["filename"] == filename
    )


def refused_share(ledger: Mapping[str, Any], route: str | None = None) -> float:
    """Share of requests (to ``route``, or all) answered 429; 0.0 when there were none."""
    requests: dict[str, int] = ledger["requests"]
    refused: dict[str, int] = ledger["refused"]
    asked = requests.get(route, 0) if route else sum(requests.values())
    denied = refused.get(route, 0) if route else sum(refused.values())
    return denied / asked if asked else 0.0


# ---------------------------------------------------------------------------------------
# Stored state


@dataclass
class _StoredFile:
    file_id: str
    filename: str
    path: Path
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    seq: int
    size: int = 0
    head: bytes = b""
    media_type: str | None = None  # fixed for outputs; sniffed from ``head`` for uploads
    output: bool = False  # a job's output (subject to output_delay / output_missing)
    session: bool = False  # an upload session, appended to by PUT /uploads/{id}
    digest: _Hasher = field(default_factory=hashlib.sha256)
    content_type: str | None = None  # as the client declared it

    def info(self) -> FileInfo:
        return FileInfo(
            self.file_id,
            self.filename,
            self.size,
            self.created_at,
            self.updated_at,
            self.expires_at,
        )

    def ledger_entry(self) -> dict[str, Any]:
        return {
            "file_id": self.file_id,
            "filename": self.filename,
            "size": self.size,
            "sha256": self.digest.hexdigest(),
            "content_type": self.content_type,
            "received_at": iso(self.created_at),
        }


@dataclass
class _Job:
    job_id: str
    file_id: str
    engine: str
    languages: tuple[str, ...]
    output_format: str
    source_name: str
    inspection: Inspection
    created_at: datetime
    started_at: datetime
    finished_at: datetime
    failure: JobError | None
    seq: int
    output_file_id: str | None = None
    settled: bool = False
    expires_at: datetime | None = None  # fixed when it settles (job_ttl may change later)


@dataclass(frozen=True)
class _JobRequest:
    file_id: str
    engine: str
    languages: tuple[str, ...]
    output_format: str


class IncomingFile:
    """A file being received: streamed to the store's directory while it is hashed.

    Use it as a context manager: leaving the block without ``commit`` discards the data.
    """

    def __init__(self, hub: Hub, file_id: str, path: Path, limit: int) -> None:
        self.file_id = file_id
        self.size = 0
        self._hub = hub
        self._path = path
        self._limit = limit
        self._digest = hashlib.sha256()
        self._head = b""
        self._out: IO[bytes] | None = None
        self._done = False

    def __enter__(self) -> IncomingFile:
        self._out = self._path.open("xb")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.discard()

    def write(self, data: bytes) -> None:
        """Append ``data``; PayloadTooLarge once the total passes the upload cap."""
        if self._out is None or self._done:
            raise RuntimeError("write outside the incoming file's block")
        if self.size + len(data) > self._limit:
            raise PayloadTooLarge("file_too_large", _too_large_message(self._limit))
        self._out.write(data)
        self._digest.update(data)
        self.size += len(data)
        if len(self._head) < SNIFF_BYTES:
            self._head = (self._head + data[:SNIFF_BYTES])[:SNIFF_BYTES]

    def commit(self, filename: str, content_type: str | None) -> FileInfo:
        """Close the file and add it to the store under ``filename``."""
        if self._out is None or self._done:
            raise RuntimeError("commit outside the incoming file's block")
        self._out.close()
        self._done = True
        return self._hub._store_upload(
            self.file_id,
            self._path,
            clean_filename(filename),
            size=self.size,
            head=self._head,
            digest=self._digest,
            content_type=content_type,
        )

    def discard(self) -> None:
        """Drop the data unless committed; safe to call twice."""
        if self._out is not None:
            self._out.close()
        if not self._done:
            self._done = True
            self._path.unlink(missing_ok=True)


def _too_large_message(limit: int) -> str:
    return f"The file exceeds the maximum upload size of {limit} bytes."


# ---------------------------------------------------------------------------------------
# The hub


class Hub:
    """The emulated LDX hub: file store, upload sessions, RenderOCR jobs, faults, ledger.

    Two locks keep it thread-safe: ``_store_lock`` guards files and jobs (and may be held
    while a file is written or a document rendered); ``_meta_lock`` guards keys, knobs, the
    RNG and rate-limit windows and is only ever held briefly, so the HTTP layer may call
    the fault and auth methods straight from its event loop.
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
        self.clock = clock or Clock()
        self._render: Renderer = renderer or render_document
        self._store_lock = threading.RLock()
        self._meta_lock = threading.Lock()
        self._ledger = _Ledger()
        self._rng = random.Random(self.settings.seed)
        self._streams: dict[str, random.Random] = {}
        self._initial_knobs = Knobs(settings.faults, settings.storage, settings.variants)
        self._knobs = self._initial_knobs
        self._outage_from = self.clock.now()  # when the ``outage`` knob was last set
        self._armed_drops: dict[str, int] = {}  # upload filename -> creates still to cut
        self._storage_tokens: dict[str, tuple[str, datetime]] = {}  # -> (file_id, expiry)
        self._gone_files: dict[str, None] = {}  # expired ids, oldest first (for a 410)
        self._gone_jobs: dict[str, None] = {}
        self._api_keys = frozenset(self.settings.api_keys)
        self._revoked = frozenset(self.settings.revoked_keys)
        self._windows: dict[str, deque[datetime]] = {}  # /files limit, per key
        self._key_windows: dict[str, deque[datetime]] = {}  # requests_per_minute, per key
        self._files: dict[str, _StoredFile] = {}
        self._jobs: dict[str, _Job] = {}
        self._due: list[tuple[datetime, str]] = []  # unsettled jobs by finish time
        self._file_expiry: list[tuple[datetime, str]] = []
        self._job_expiry: list[tuple[datetime, str]] = []
        self._seq = itertools.count()

    # -- auth ---------------------------------------------------------------------------

    def check_key(self, authorization: str | None) -> Access:
        """Judge an Authorization header against the known and revoked keys."""
        if not (authorization or "").strip():
            return Access.MISSING
        key = bearer_key(authorization)
        if key is None:
            return Access.MALFORMED
        with self._meta_lock:
            if key in self._revoked:
                return Access.REVOKED
            return Access.GRANTED if key in self._api_keys else Access.UNKNOWN

    def set_keys(
        self, api_keys: Iterable[str] | None = None, revoked: Iterable[str] | None = None
    ) -> dict[str, list[str]]:
        """Replace the valid and/or revoked keys; return both lists."""
        with self._meta_lock:
            if api_keys is not None:
                self._api_keys = frozenset(api_keys)
            if revoked is not None:
                self._revoked = frozenset(revoked)
            return {"api_keys": sorted(self._api_keys), "revoked": sorted(self._revoked)}

    # -- knobs --------------------------------------------------------------------------

    @property
    def knobs(self) -> Knobs:
        """Every knob in force.

        Read without the lock: ``Knobs`` is immutable and replaced whole, and taking a
        reference is atomic, so every request pays no lock to look at its knobs.
        """
        return self._knobs

    @property
    def faults(self) -> Faults:
        """The request-fault knobs in force."""
        return self.knobs.faults

    def update_knobs(self, changes: Mapping[str, object]) -> Knobs:
        """Change any knobs, all or none (ValueError names a bad one); return them all.

        Setting ``outage`` to a number starts that many seconds of outage now.
        """
        now = self.clock.now()
        with self._meta_lock:
            self._knobs = self._knobs.updated(changes)
            if "outage" in changes:
                self._outage_from = now
            return self._knobs

    def update_faults(self, changes: Mapping[str, object]) -> Faults:
        """``update_knobs``, returning the request-fault knobs (the older interface)."""
        return self.update_knobs(changes).faults

    def reset_knobs(self) -> Knobs:
        """Put every knob back to how the hub was built."""
        now = self.clock.now()
        with self._meta_lock:
            self._knobs = self._initial_knobs
            self._outage_from = now
            self._armed_drops.clear()
            return self._knobs

    def _stream(self, key: str | None) -> random.Random:
        """The random stream of one client job (by its trace header), or the shared one.

        With one shared stream, the draws a request gets depend on how many requests of
        other clients came first: the last file of a seeded run then meets whatever
        streak of faults the seed holds at that point, alone. Call under ``_meta_lock``.
        """
        if key is None or self.settings.seed is None:
            return self._rng
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = random.Random(f"{self.settings.seed}/{key}")
        return stream

    def draw_fault(self, stream: str | None = None) -> Fault | None:
        """Decide whether this request is dropped, answered 5xx or 429; count it.

        ``stream`` names the client job the request is for (see ``_stream``)."""
        with self._meta_lock:
            knobs = self._knobs.faults
            total = knobs.drop_rate + knobs.error_rate + knobs.rate_limit_rate
            if total <= 0:
                return None
            rng = self._stream(stream)
            draw = rng.random()
            fault: Fault | None = None
            if draw < knobs.drop_rate:
                fault = Fault("drop")
            elif draw < knobs.drop_rate + knobs.error_rate:
                fault = Fault("error", status=rng.choice((500, 502, 503)))
            elif draw < total:
                fault = Fault("rate_limit", status=429, retry_after=knobs.retry_after)
        if fault is not None:
            self._ledger.count_fault(fault.kind)
        return fault

    def _use_up(self, name: str, kind: str) -> bool:
        """Take one from the count-down fault knob ``name``; count ``kind`` if there was one."""
        with self._meta_lock:
            left = getattr(self._knobs.faults, name)
            if left <= 0:
                return False
            self._knobs = self._knobs.updated({name: left - 1})
        self._ledger.count_fault(kind)
        return True

    def take_stall(self) -> bool:
        """Use up one of the stalled downloads still to come; False when none is left."""
        return self._use_up("stall_downloads", "stall")

    def take_lost_reply(self, job_id: str) -> bool:
        """Whether the reply creating ``job_id`` is to be lost (``lose_create_replies``)."""
        if not self._use_up("lose_create_replies", "lost_reply"):
            return False
        self._ledger.update_job(job_id, reply_lost=True)
        return True

    def take_create_drop(self, body: object) -> bool:
        """Whether a create request is to be cut before any job is made.

        Either ``drop_create_requests`` still counts down, or a job for the same upload
        filename failed and ``drop_create_after_failure`` armed drops for that name. The
        name, not the file_id, is matched: a client may upload the scan again to retry.
        """
        if self._use_up("drop_create_requests", "dropped_create"):
            return True
        if not self._armed_drops and self._knobs.faults.drop_create_after_failure <= 0:
            return False  # nothing armed, nothing to arm: no need to settle
        file_id = body.get("file_id") if isinstance(body, dict) else None
        with self._store_lock:
            self._settle()  # a failure due by now arms its drops first
            stored = self._files.get(file_id) if isinstance(file_id, str) else None
            name = stored.filename if stored is not None else None
        with self._meta_lock:
            left = self._armed_drops.get(name or "", 0)
            if left <= 0:
                return False
            if left > 1:
                self._armed_drops[name or ""] = left - 1
            else:
                del self._armed_drops[name or ""]
        self._ledger.count_fault("dropped_create")
        return True

    def _arm_drops(self, filename: str) -> None:
        """A job on ``filename`` failed: arm drop_create_after_failure for that name."""
        with self._meta_lock:
            count = self._knobs.faults.drop_create_after_failure
            if count > 0:
                self._armed_drops[filename] = count

    def outage(self, public: bool = False) -> str | None:
        """The ``outage_mode`` if an outage is on for this request, else None; counted."""
        with self._meta_lock:
            faults, started = self._knobs.faults, self._outage_from
        if faults.outage is False or (public and faults.outage_spares_engines):
            return None
        now = self.clock.now()
        if faults.outage is not True and now >= started + timedelta(seconds=faults.outage):
            return None
        self._ledger.count_fault("outage")
        return faults.outage_mode

    def refusal(self, route: str) -> int | None:
        """``refuse_status`` if ``route`` is the refused one (``refuse_route``), else None."""
        faults = self.faults
        if not faults.refuse_route or route != faults.refuse_route:
            return None
        self._ledger.count_fault("refused_route")
        return faults.refuse_status

    def throttle(self, key: str) -> float | None:
        """Apply the per-key limit on /files; return Retry-After seconds when over it.

        A sliding one-minute window, as Zuplo's rate-limit policy uses; refused requests
        do not count against the window.
        """
        return self._slide(self._windows, key, self.faults.files_rate_limit)

    def limit_requests(self, key: str) -> float | None:
        """Apply ``requests_per_minute`` (every authenticated route); Retry-After or None."""
        return self._slide(self._key_windows, key, self.faults.requests_per_minute)

    def _slide(self, windows: dict[str, deque[datetime]], key: str, limit: int) -> float | None:
        if limit <= 0:
            return None
        now = self.clock.now()
        with self._meta_lock:
            window = windows.setdefault(key, deque())
            while window and window[0] <= now - _RATE_WINDOW:
                window.popleft()
            if len(window) < limit:
                window.append(now)
                return None
            wait = (window[0] + _RATE_WINDOW - now).total_seconds()
        self._ledger.count_fault("throttle")
        return float(max(1, math.ceil(wait)))

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

    def ledger(self) -> dict[str, Any]:
        """Return a copy of the ledger (a JSON-ready dict).

        A job whose end has passed on the clock shows its outcome even if nobody has
        looked at it since: worked out here, without settling it, so that reading the
        ledger never moves the rendering of outputs into the reader's thread.
        """
        snapshot = self._ledger.snapshot()
        now = self.clock.now()
        with self._store_lock:
            for entry in snapshot["jobs"]:
                job = self._jobs.get(entry["job_id"]) if entry["outcome"] == "pending" else None
                if job is not None and job.finished_at <= now:
                    entry["outcome"] = "failed" if job.failure is not None else "completed"
        return snapshot

    def reset_ledger(self) -> None:
        """Forget everything the ledger recorded."""
        self._ledger.reset()

    # -- files --------------------------------------------------------------------------

    def receive_file(self) -> IncomingFile:
        """Start receiving an upload; use the result as a context manager."""
        file_id = self._new_id()
        path = self._disk_path(file_id)
        return IncomingFile(self, file_id, path, self.settings.max_upload_bytes)

    def _new_id(self) -> str:
        """A file or job id: plain, or hostile while ``hostile_ids`` is on."""
        return hostile_id() if self.knobs.variants.hostile_ids else new_id()

    def _disk_path(self, file_id: str) -> Path:
        """Where a file is stored: a hostile id must not pick a path (``../../x``)."""
        if _PLAIN_ID.fullmatch(file_id):
            return self.data_dir / file_id
        return self.data_dir / ("h" + hashlib.sha256(file_id.encode()).hexdigest()[:31])

    def add_file(self, filename: str, data: bytes, content_type: str | None = None) -> FileInfo:
        """Store ``data`` as an uploaded file (a shortcut for tests and demos)."""
        with self.receive_file() as incoming:
            incoming.write(data)
            return incoming.commit(filename, content_type)

    def create_upload_session(self, filename: str) -> FileInfo:
        """Create the empty file of an upload session (``POST /uploads``)."""
        file_id = self._new_id()
        path = self._disk_path(file_id)
        path.touch(exist_ok=False)
        return self._store_upload(
            file_id, path, clean_filename(filename), size=0, head=b"", session=True
        )

    def append_upload(self, file_id: str, data: bytes) -> FileInfo:
        """Append a decoded chunk to an upload session (``PUT /uploads/{id}``)."""
        if len(data) > self.settings.max_chunk_bytes:
            message = f"A chunk may hold at most {self.settings.max_chunk_bytes} bytes."
            raise PayloadTooLarge("chunk_too_large", message)
        with self._store_lock:
            now = self._settle()
            stored = self._files.get(file_id)
            if stored is None or not stored.session:
                raise NotFound("upload_not_found", f"No upload session {file_id!r} exists.")
            if stored.size + len(data) > self.settings.max_upload_bytes:
                message = _too_large_message(self.settings.max_upload_bytes)
                raise PayloadTooLarge("file_too_large", message)
            with stored.path.open("ab") as out:
                out.write(data)
            stored.digest.update(data)
            stored.size += len(data)
            stored.head = (stored.head + data[:SNIFF_BYTES])[:SNIFF_BYTES]
            stored.updated_at = max(stored.updated_at, now)
            self._ledger.record_upload(stored.ledger_entry())
            return stored.info()

    def list_files(self) -> list[FileInfo]:
        """Every live file, uploads and outputs alike, newest first."""
        with self._store_lock:
            self._settle()
            files = sorted(self._files.values(), key=lambda f: f.seq, reverse=True)
            return [stored.info() for stored in files]

    def get_file(self, file_id: str) -> FileInfo:
        """FileInfo of a live file; NotFound if unknown or expired."""
        with self._store_lock:
            self._settle()
            return self._live_file(file_id).info()

    def file_size(self, file_id: str) -> int:
        """Bytes stored for ``file_id`` so far (0 when unknown); no expiry check."""
        with self._store_lock:
            stored = self._files.get(file_id)
            return 0 if stored is None else stored.size

    def hold_output(self, file_id: str) -> None:
        """Answer NotFound for an output storage has not got yet, or never will.

        Storage may lag behind the job table (``output_delay``) or lose the file
        (``output_missing``); uploads are never held. The HTTP layer calls this before
        file info and downloads; ``open_download`` itself stays a plain store lookup.
        """
        storage = self.knobs.storage
        if not (storage.output_missing or storage.output_delay > 0):
            return
        with self._store_lock:
            now = self._settle()
            stored = self._files.get(file_id)
            if stored is None or not stored.output:
                return
            ready = stored.created_at + timedelta(seconds=storage.output_delay)
            if not storage.output_missing and now >= ready:
                return
        self._ledger.count_fault("storage_lag")
        raise NotFound("file_not_found", f"File {file_id!r} does not exist or has expired.")

    def storage_token(self, file_id: str) -> str:
        """A short-lived token naming ``file_id`` on the storage route (a pre-signed URL)."""
        token = secrets.token_hex(16)
        now = self.clock.now()
        with self._meta_lock:
            tokens = self._storage_tokens
            for old in [t for t, (_, end) in tokens.items() if end <= now][:100]:
                del tokens[old]
            while len(tokens) >= _MAX_STORAGE_TOKENS:
                del tokens[next(iter(tokens))]
            tokens[token] = (file_id, now + _STORAGE_TOKEN_TTL)
        return token

    def resolve_storage_token(self, token: str) -> str | None:
        """The file_id a live storage token names, or None."""
        now = self.clock.now()
        with self._meta_lock:
            entry = self._storage_tokens.get(token)
        return entry[0] if entry is not None and now < entry[1] else None

    def count_storage_authorization(self) -> None:
        """Note a storage request that carried an Authorization header (a leaked key)."""
        self._ledger.count_storage_authorization()

    def open_download(self, file_id: str) -> Download:
        """Where and how to stream a live file; NotFound if unknown or expired."""
        with self._store_lock:
            self._settle()
            stored = self._live_file(file_id)
            fmt = sniff(stored.head)
            media_type = stored.media_type or MEDIA_TYPES.get(fmt.value if fmt else "")
            return Download(
                stored.file_id,
                stored.path,
                stored.filename,
                stored.size,
                media_type or "application/octet-stream",
                stored.updated_at,
            )

    # -- jobs ---------------------------------------------------------------------------

    def engines(self) -> list[dict[str, Any]]:
        """The body of ``GET /renderocr/engines`` under ``data``."""
        conversions = [{"from": f, "to": t} for f in INPUT_FORMATS for t in OUTPUT_FORMATS]
        languages = [{"code": code, "display_name": name} for code, name in LANGUAGES]
        return [
            {
                "id": ENGINE_ID,
                "display_name": "KI OCR",
                "provider": "ki",
                "description": (
                    "OCR for scanned PDFs and images: produces editable Word, Excel or "
                    "PowerPoint documents that keep the page layout."
                ),
                "supported_conversions": conversions,
                "supported_languages": languages,
            }
        ]

    def create_job(self, body: object) -> JobInfo:
        """Validate a ``POST /renderocr/jobs`` body and queue the job.

        Refusals raise InvalidRequest. A file that is unsupported or broken is accepted
        here and the job fails later, as the real hub detects formats while converting.
        """
        request = _parse_job_request(body)
        with self._store_lock:
            self._settle()
            stored = self._files.get(request.file_id)
            if stored is None:
                raise _no_such_input(request.file_id)
            path, source_name = stored.path, stored.filename
        try:  # outside the lock: a big PDF takes a moment to scan
            inspection = inspect_file(path)
        except FileNotFoundError:  # expired while we looked
            raise _no_such_input(request.file_id) from None
        with self._store_lock:
            job = self._new_job(request, source_name, inspection)
            self._jobs[job.job_id] = job
            heapq.heappush(self._due, (job.finished_at, job.job_id))
            self._ledger.record(
                "jobs",
                {
                    "job_id": job.job_id,
                    "file_id": job.file_id,
                    "engine": job.engine,
                    "languages": list(job.languages),
                    "output_format": job.output_format,
                    "created_at": iso(job.created_at),
                    # Exact end on the hub clock (epoch seconds), for latency benchmarks.
                    "finishes_at": job.finished_at.timestamp(),
                    # What is billed: this job's pages, whatever its outcome.
                    "filename": source_name,
                    "input_pages": inspection.pages,
                    "outcome": "pending",  # then "completed" or "failed"
                    "reply_lost": False,  # lose_create_replies cut the 202
                },
            )
            # The 202 answer shows the job as accepted: queued, whatever the queue delay.
            return self._view(job, job.created_at)

    def list_jobs(self) -> list[JobInfo]:
        """Every live job, newest first (no paging, as documented)."""
        with self._store_lock:
            now = self._settle()
            jobs = sorted(self._jobs.values(), key=lambda j: j.seq, reverse=True)
            return [self._view(job, now) for job in jobs]

    def get_job(self, job_id: str) -> JobInfo:
        """A job as it stands now; NotFound if unknown or expired."""
        with self._store_lock:
            now = self._settle()
            job = self._jobs.get(job_id)
            if job is None:
                gone = Expired if job_id in self._gone_jobs else NotFound
                raise gone("job_not_found", f"Job {job_id!r} does not exist or has expired.")
            return self._view(job, now)

    def job_terminal_at(self, job_id: str) -> datetime | None:
        """When a job reaches completed/failed on the clock (None if unknown), for long polls."""
        with self._store_lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.finished_at

    # -- internals ----------------------------------------------------------------------

    def _store_upload(
        self,
        file_id: str,
        path: Path,
        filename: str,
        *,
        size: int,
        head: bytes,
        digest: _Hasher | None = None,
        content_type: str | None = None,
        session: bool = False,
    ) -> FileInfo:
        with self._store_lock:
            now = self._settle()
            stored = self._add_stored(file_id, path, filename, now)
            stored.size, stored.head, stored.session = size, head, session
            stored.content_type = content_type
            if digest is not None:
                stored.digest = digest
            self._ledger.record_upload(stored.ledger_entry())
            return stored.info()

    def _add_stored(
        self, file_id: str, path: Path, filename: str, created: datetime, ttl: float | None = None
    ) -> _StoredFile:
        expires = created + timedelta(seconds=ttl or self.settings.file_ttl)
        stored = _StoredFile(file_id, filename, path, created, created, expires, next(self._seq))
        self._files[file_id] = stored
        heapq.heappush(self._file_expiry, (expires, file_id))
        return stored

    def _live_file(self, file_id: str) -> _StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            gone = Expired if file_id in self._gone_files else NotFound
            raise gone("file_not_found", f"File {file_id!r} does not exist or has expired.")
        return stored

    def _new_job(self, request: _JobRequest, source_name: str, inspection: Inspection) -> _Job:
        now = self.clock.now()
        started = now + timedelta(seconds=self.settings.queue_delay)
        failure: JobError | None = None
        if inspection.problem is not None:
            # The real hub sniffs while converting, so refusals come as soon as work starts.
            finished = started
            failure = JobError(*inspection.problem, request_id=new_id())
        else:
            finished = started + timedelta(seconds=self._draw_processing_time())
            if self._draw_job_failure(source_name):
                failure = JobError("upstream_service_error", UPSTREAM_ERROR_MESSAGE, new_id())
        return _Job(
            job_id=self._new_id(),
            file_id=request.file_id,
            engine=request.engine,
            languages=request.languages,
            output_format=request.output_format,
            source_name=source_name,
            inspection=inspection,
            created_at=now,
            started_at=started,
            finished_at=finished,
            failure=failure,
            seq=next(self._seq),
        )

    def _draw_processing_time(self) -> float:
        low, high = self.settings.processing_range
        if low == high:
            return low
        with self._meta_lock:
            return self._rng.uniform(low, high)

    def _draw_job_failure(self, source_name: str) -> bool:
        # Keyed by the input's name: whether its n-th conversion fails is then fixed by
        # the seed, however the clients' requests interleave.
        with self._meta_lock:
            rate = self._knobs.faults.job_failure_rate
            failed = rate > 0 and self._stream(f"job:{source_name}").random() < rate
        if failed:
            self._ledger.count_fault("job_failure")
        return failed

    def _settle(self) -> datetime:
        """Finish due jobs and drop expired files and jobs; return the time used.

        Called under the store lock by every operation, so state is always current
        without any background thread.
        """
        now = self.clock.now()
        while self._due and self._due[0][0] <= now:
            _, job_id = heapq.heappop(self._due)
            job = self._jobs.get(job_id)
            if job is not None:
                self._finish(job, now)
        while self._file_expiry and self._file_expiry[0][0] <= now:
            _, file_id = heapq.heappop(self._file_expiry)
            stored = self._files.pop(file_id, None)
            if stored is not None:
                stored.path.unlink(missing_ok=True)
                _remember(self._gone_files, file_id)
        while self._job_expiry and self._job_expiry[0][0] <= now:
            _, job_id = heapq.heappop(self._job_expiry)
            if self._jobs.pop(job_id, None) is not None:
                _remember(self._gone_jobs, job_id)
        return now

    def _finish(self, job: _Job, now: datetime) -> None:
        """Settle a job that reached its end: render its output file if it succeeded."""
        job.settled = True
        storage = self.knobs.storage
        job.expires_at = job.finished_at + timedelta(
            seconds=storage.job_ttl or self.settings.job_ttl
        )
        heapq.heappush(self._job_expiry, (job.expires_at, job.job_id))
        if job.failure is None:
            self._store_output(job, now, storage)
        outcome = "failed" if job.failure is not None else "completed"
        self._ledger.update_job(job.job_id, outcome=outcome)
        if job.failure is not None:
            self._arm_drops(job.source_name)

    def _store_output(self, job: _Job, now: datetime, storage: Storage) -> None:
        """Render and store a completed job's output (or fail the job if rendering fails)."""
        output_id = self._new_id()
        job.output_file_id = output_id
        ttl = storage.output_ttl or self.settings.file_ttl
        if job.finished_at + timedelta(seconds=ttl) <= now:
            # The clock jumped past the output's own expiry: nothing left to store.
            _remember(self._gone_files, output_id)
            return
        fmt = job.inspection.input_format
        try:
            document = self._render(
                job.output_format,
                source_name=job.source_name,
                engine=job.engine,
                language=job.languages[0],
                pages=job.inspection.pages,
                input_format=fmt.value if fmt else "",
            )
        except Exception as exc:  # a renderer bug must show, not hang the job
            job.output_file_id = None
            job.failure = JobError("internal_error", f"Rendering failed: {exc}", new_id())
            return
        path = self._disk_path(output_id)
        size = self._write_output(path, document, job.output_format, storage)
        stem = PurePosixPath(job.source_name).stem or "output"
        name = f"{stem}.{job.output_format}"
        stored = self._add_stored(output_id, path, name, job.finished_at, ttl)
        stored.size = size
        stored.head = document[:SNIFF_BYTES]
        stored.media_type = MEDIA_TYPES[job.output_format]
        stored.output = True

    def _write_output(self, path: Path, document: bytes, output_format: str, knobs: Storage) -> int:
        """Write an output: the document, padded to ``output_size``, or a bomb built from it."""
        if knobs.output_bomb == "none" or output_format not in bombs.MAIN_PARTS:
            return write_package(path, document, self.settings.output_size)
        if knobs.output_bomb == "zeros":
            members = bombs.zeros_bomb(document, knobs.bomb_bytes)
        else:
            members = bombs.deep_xml_bomb(document, output_format, knobs.bomb_depth)
        return bombs.write_zip(path, members)

    def _job_ttl(self) -> timedelta:
        return timedelta(seconds=self.knobs.storage.job_ttl or self.settings.job_ttl)

    def _view(self, job: _Job, now: datetime) -> JobInfo:
        """The job as seen at ``now`` (already settled if its end has passed)."""
        if job.settled:
            failed = job.failure is not None
            billed = job.inspection.pages
            usage = None if failed and not self.knobs.variants.usage_on_failure else billed
            return JobInfo(
                job.job_id,
                job.file_id,
                job.engine,
                "failed" if failed else "completed",
                0.0 if failed else 1.0,  # failed jobs keep progress 0.0, as observed
                job.created_at,
                job.finished_at,
                job.finished_at,
                job.expires_at or job.finished_at + self._job_ttl(),
                output_file_id=job.output_file_id,
                error=job.failure,
                usage=usage,
            )
        # Until completion expires_at is provisional (the real value is unknown).
        provisional_expiry = job.created_at + self._job_ttl()
        if now <= job.started_at:
            return JobInfo(
                job.job_id,
                job.file_id,
                job.engine,
                "queued",
                0.0,
                job.created_at,
                job.created_at,
                None,
                provisional_expiry,
            )
        # Progress moves in tenths; updated_at is when the current tenth was reached.
        total = max(job.finished_at - job.started_at, timedelta(microseconds=1))
        step = min(_PROGRESS_STEPS - 1, int((now - job.started_at) / total * _PROGRESS_STEPS))
        return JobInfo(
            job.job_id,
            job.file_id,
            job.engine,
            "processing",
            step / _PROGRESS_STEPS,
            job.created_at,
            job.started_at + total * step / _PROGRESS_STEPS,
            None,
            provisional_expiry,
        )


def _no_such_input(file_id: str) -> MissingInput:
    # The n8n node's docs list "400 Bad Request - invalid file_id" for this case.
    return MissingInput("invalid_file_id", f"File {file_id!r} does not exist or has expired.")


def _remember(gone: dict[str, None], key: str) -> None:
    """Add an expired id to a bounded, oldest-first record."""
    gone[key] = None
    if len(gone) > _MAX_GONE:
        del gone[next(iter(gone))]


def _parse_job_request(body: object) -> _JobRequest:
    """Check a job-creation body against the engine list; InvalidRequest if it fails.

    The real validation codes are unknown; these are the backend's {code, message} style.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_request", "The request body must be a JSON object.")
    for name in ("file_id", "engine", "output_format"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise InvalidRequest("invalid_request", f"'{name}' is required and must be a string.")
    languages = body.get("languages")
    # Required, like the n8n node treats it; only the first entry is used, all must exist.
    if (
        not isinstance(languages, list)
        or not languages
        or not all(isinstance(code, str) for code in languages)
    ):
        message = "'languages' must be a non-empty array of language codes."
        raise InvalidRequest("invalid_request", message)
    request = _JobRequest(body["file_id"], body["engine"], tuple(languages), body["output_format"])
    if request.engine != ENGINE_ID:
        message = f"Unknown engine {request.engine!r}; see GET /renderocr/engines."
        raise InvalidRequest("invalid_engine", message)
    offered = {code for code, _ in LANGUAGES}
    for code in request.languages:
        if code not in offered:
            message = f"Engine {ENGINE_ID!r} does not offer language {code!r}."
            raise InvalidRequest("invalid_language", message)
    if request.output_format not in OUTPUT_FORMATS:
        message = (
            f"Engine {ENGINE_ID!r} cannot produce {request.output_format!r}; "
            f"choose one of {', '.join(OUTPUT_FORMATS)}."
        )
        raise InvalidRequest("invalid_output_format", message)
    return request
