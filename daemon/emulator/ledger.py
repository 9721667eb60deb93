"""The ledger: what the hub received, and what it would bill, for tests to read.

Every job created is one paid conversion of ``input_pages`` pages, whatever its outcome
("every conversion is a bill", fact sheet §14); refused requests (429) are told apart
from answered ones. ``paid_conversions``, ``pages_billed`` and ``refused_share`` add a
ledger up.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any, Literal

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

_MAX_EVENTS = 200_000


class Ledger:
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
