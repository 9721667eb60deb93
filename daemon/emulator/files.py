"""The hub's file store: uploads, upload sessions, job outputs, downloads and expiry.

Every file lives on disk in the store's directory, under its id (or a hash of a hostile
one). Expiry is computed lazily from the ``Clock``: each operation first settles, which
moves the jobs on (``on_settle``: a job due by now stores its output) and then drops the
files whose time is up, so state is always current without any background thread.
Pre-signed storage URLs (``download_redirect``) are ``StorageTokens``.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

from daemon.emulator.clock import Clock
from daemon.emulator.knobs import Knobs
from daemon.emulator.ledger import Ledger
from daemon.emulator.models import (
    Download,
    FileInfo,
    clean_filename,
    hostile_id,
    iso,
    new_id,
)
from daemon.emulator.refusals import Expired, NotFound, PayloadTooLarge
from daemon.emulator.settings import HubSettings
from daemon.formats import SNIFF_BYTES, sniff

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

_MAX_GONE = 100_000  # expired ids remembered for a 410 (expired_status)
_STORAGE_TOKEN_TTL = timedelta(minutes=15)  # pre-signed storage URLs are short-lived
_MAX_STORAGE_TOKENS = 10_000
_PLAIN_ID = re.compile(r"[a-z0-9]{32}")


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def remember(gone: dict[str, None], key: str) -> None:
    """Add an expired id to a bounded, oldest-first record."""
    gone[key] = None
    if len(gone) > _MAX_GONE:
        del gone[next(iter(gone))]


def too_large_message(limit: int) -> str:
    """The message of an upload refused for passing ``limit`` bytes."""
    return f"The file exceeds the maximum upload size of {limit} bytes."


@dataclass
class StoredFile:
    """One file in the store, as the store sees it (more than its FileInfo)."""

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
        """The FileInfo the API shows."""
        return FileInfo(
            self.file_id,
            self.filename,
            self.size,
            self.created_at,
            self.updated_at,
            self.expires_at,
        )

    def ledger_entry(self) -> dict[str, Any]:
        """The ledger's record of this upload."""
        return {
            "file_id": self.file_id,
            "filename": self.filename,
            "size": self.size,
            "sha256": self.digest.hexdigest(),
            "content_type": self.content_type,
            "received_at": iso(self.created_at),
        }


class IncomingFile:
    """A file being received: streamed to the store's directory while it is hashed.

    Use it as a context manager: leaving the block without ``commit`` discards the data.
    """

    def __init__(self, store: FileStore, file_id: str, path: Path, limit: int) -> None:
        self.file_id = file_id
        self.size = 0
        self._store = store
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
            raise PayloadTooLarge("file_too_large", too_large_message(self._limit))
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
        return self._store.store_upload(
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


class StorageTokens:
    """Short-lived tokens naming a file on the storage route (pre-signed URLs)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # held briefly: callers run on the event loop
        self._tokens: dict[str, tuple[str, datetime]] = {}  # -> (file_id, expiry)

    def issue(self, file_id: str) -> str:
        """A fresh token for ``file_id``; the oldest go when there are too many."""
        token = secrets.token_hex(16)
        now = self._clock.now()
        with self._lock:
            tokens = self._tokens
            for old in [t for t, (_, end) in tokens.items() if end <= now][:100]:
                del tokens[old]
            while len(tokens) >= _MAX_STORAGE_TOKENS:
                del tokens[next(iter(tokens))]
            tokens[token] = (file_id, now + _STORAGE_TOKEN_TTL)
        return token

    def resolve(self, token: str) -> str | None:
        """The file_id a live token names, or None."""
        now = self._clock.now()
        with self._lock:
            entry = self._tokens.get(token)
        return entry[0] if entry is not None and now < entry[1] else None


def _nothing(now: datetime) -> None:
    """No jobs to move on (until ``FileStore.on_settle`` names some)."""


class FileStore:
    """Every live file, uploads and outputs alike, with its expiry; thread-safe.

    ``lock`` guards the files, and the jobs too (``Jobs`` shares it): it may be held
    while a file is written or a document rendered. ``knobs`` reads the knobs in force.
    """

    def __init__(
        self,
        data_dir: Path,
        settings: HubSettings,
        clock: Clock,
        ledger: Ledger,
        knobs: Callable[[], Knobs],
    ) -> None:
        self.data_dir = data_dir
        self.lock = threading.RLock()
        self._settings = settings
        self._clock = clock
        self._ledger = ledger
        self._knobs = knobs
        self._files: dict[str, StoredFile] = {}
        self._expiry: list[tuple[datetime, str]] = []
        self._gone: dict[str, None] = {}  # expired ids, oldest first (for a 410)
        self._seq = itertools.count()
        self._settle_jobs: Callable[[datetime], None] = _nothing

    def on_settle(self, settle_jobs: Callable[[datetime], None]) -> None:
        """Have every settle first move the jobs on to ``now`` (under ``lock``)."""
        self._settle_jobs = settle_jobs

    def settle(self) -> datetime:
        """Finish due jobs and drop expired files; return the time used. Call under ``lock``."""
        now = self._clock.now()
        self._settle_jobs(now)
        while self._expiry and self._expiry[0][0] <= now:
            _, file_id = heapq.heappop(self._expiry)
            stored = self._files.pop(file_id, None)
            if stored is not None:
                stored.path.unlink(missing_ok=True)
                remember(self._gone, file_id)
        return now

    # -- ids and places -----------------------------------------------------------------

    def new_id(self) -> str:
        """A file or job id: plain, or hostile while ``hostile_ids`` is on."""
        return hostile_id() if self._knobs().variants.hostile_ids else new_id()

    def disk_path(self, file_id: str) -> Path:
        """Where a file is stored: a hostile id must not pick a path (``../../x``)."""
        if _PLAIN_ID.fullmatch(file_id):
            return self.data_dir / file_id
        return self.data_dir / ("h" + hashlib.sha256(file_id.encode()).hexdigest()[:31])

    # -- uploads ------------------------------------------------------------------------

    def receive_file(self) -> IncomingFile:
        """Start receiving an upload; use the result as a context manager."""
        file_id = self.new_id()
        path = self.disk_path(file_id)
        return IncomingFile(self, file_id, path, self._settings.max_upload_bytes)

    def add_file(self, filename: str, data: bytes, content_type: str | None = None) -> FileInfo:
        """Store ``data`` as an uploaded file (a shortcut for tests and demos)."""
        with self.receive_file() as incoming:
            incoming.write(data)
            return incoming.commit(filename, content_type)

    def create_upload_session(self, filename: str) -> FileInfo:
        """Create the empty file of an upload session (``POST /uploads``)."""
        file_id = self.new_id()
        path = self.disk_path(file_id)
        path.touch(exist_ok=False)
        return self.store_upload(
            file_id, path, clean_filename(filename), size=0, head=b"", session=True
        )

    def append_upload(self, file_id: str, data: bytes) -> FileInfo:
        """Append a decoded chunk to an upload session (``PUT /uploads/{id}``)."""
        if len(data) > self._settings.max_chunk_bytes:
            message = f"A chunk may hold at most {self._settings.max_chunk_bytes} bytes."
            raise PayloadTooLarge("chunk_too_large", message)
        with self.lock:
            now = self.settle()
            stored = self._files.get(file_id)
            if stored is None or not stored.session:
                raise NotFound("upload_not_found", f"No upload session {file_id!r} exists.")
            if stored.size + len(data) > self._settings.max_upload_bytes:
                message = too_large_message(self._settings.max_upload_bytes)
                raise PayloadTooLarge("file_too_large", message)
            with stored.path.open("ab") as out:
                out.write(data)
            stored.digest.update(data)
            stored.size += len(data)
            stored.head = (stored.head + data[:SNIFF_BYTES])[:SNIFF_BYTES]
            stored.updated_at = max(stored.updated_at, now)
            self._ledger.record_upload(stored.ledger_entry())
            return stored.info()

    def store_upload(
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
        """Add a received upload (already on disk at ``path``) and record it."""
        with self.lock:
            now = self.settle()
            stored = self._add(file_id, path, filename, now)
            stored.size, stored.head, stored.session = size, head, session
            stored.content_type = content_type
            if digest is not None:
                stored.digest = digest
            self._ledger.record_upload(stored.ledger_entry())
            return stored.info()

    # -- outputs ------------------------------------------------------------------------

    def add_output(
        self,
        file_id: str,
        filename: str,
        created: datetime,
        ttl: float,
        *,
        size: int,
        head: bytes,
        media_type: str,
    ) -> None:
        """Add a job's output, written at ``disk_path(file_id)``. Call under ``lock``."""
        stored = self._add(file_id, self.disk_path(file_id), filename, created, ttl)
        stored.size = size
        stored.head = head
        stored.media_type = media_type
        stored.output = True

    def forget(self, file_id: str) -> None:
        """Record ``file_id`` as expired without storing it (its time passed already)."""
        remember(self._gone, file_id)

    def hold_output(self, file_id: str) -> None:
        """Answer NotFound for an output storage has not got yet, or never will.

        Storage may lag behind the job table (``output_delay``) or lose the file
        (``output_missing``); uploads are never held. The HTTP layer calls this before
        file info and downloads; ``open_download`` itself stays a plain store lookup.
        """
        storage = self._knobs().storage
        if not (storage.output_missing or storage.output_delay > 0):
            return
        with self.lock:
            now = self.settle()
            stored = self._files.get(file_id)
            if stored is None or not stored.output:
                return
            ready = stored.created_at + timedelta(seconds=storage.output_delay)
            if not storage.output_missing and now >= ready:
                return
        self._ledger.count_fault("storage_lag")
        raise NotFound("file_not_found", f"File {file_id!r} does not exist or has expired.")

    # -- reads --------------------------------------------------------------------------

    def list_files(self) -> list[FileInfo]:
        """Every live file, uploads and outputs alike, newest first."""
        with self.lock:
            self.settle()
            files = sorted(self._files.values(), key=lambda f: f.seq, reverse=True)
            return [stored.info() for stored in files]

    def get_file(self, file_id: str) -> FileInfo:
        """FileInfo of a live file; NotFound if unknown or expired."""
        with self.lock:
            self.settle()
            return self._live(file_id).info()

    def file_size(self, file_id: str) -> int:
        """Bytes stored for ``file_id`` so far (0 when unknown); no expiry check."""
        with self.lock:
            stored = self._files.get(file_id)
            return 0 if stored is None else stored.size

    def source(self, file_id: str) -> tuple[Path, str] | None:
        """Path and upload filename of a live file, or None. Call under ``lock``."""
        stored = self._files.get(file_id)
        return None if stored is None else (stored.path, stored.filename)

    def filename_of(self, file_id: object) -> str | None:
        """The upload filename a file_id stands for, once due jobs are settled, or None."""
        with self.lock:
            self.settle()
            stored = self._files.get(file_id) if isinstance(file_id, str) else None
            return stored.filename if stored is not None else None

    def open_download(self, file_id: str) -> Download:
        """Where and how to stream a live file; NotFound if unknown or expired."""
        with self.lock:
            self.settle()
            stored = self._live(file_id)
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

    # -- internals ----------------------------------------------------------------------

    def _add(
        self, file_id: str, path: Path, filename: str, created: datetime, ttl: float | None = None
    ) -> StoredFile:
        expires = created + timedelta(seconds=ttl or self._settings.file_ttl)
        stored = StoredFile(file_id, filename, path, created, created, expires, next(self._seq))
        self._files[file_id] = stored
        heapq.heappush(self._expiry, (expires, file_id))
        return stored

    def _live(self, file_id: str) -> StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            gone = Expired if file_id in self._gone else NotFound
            raise gone("file_not_found", f"File {file_id!r} does not exist or has expired.")
        return stored
