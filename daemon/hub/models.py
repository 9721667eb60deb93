"""The hub's answers as the daemon reads them: lenient wherever the meaning is clear.

The hub's public API reference leaves much unsaid, so every model
accepts unknown fields and absent optional ones, and reads the variants a gateway may
send: a status in any case, ``error`` as an object or a bare string, ``progress`` as a
fraction or a percentage, timestamps with fractions or an offset, an engine list as
objects or strings under any wrapper key. Every text the hub sends is cleaned before
the daemon stores or shows it (``hub_text``): the API key, any ``Bearer`` value and
control characters are removed, and its length is bounded.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from daemon.errors import HubUnavailable
from daemon.logs import plain

_M = TypeVar("_M", bound=BaseModel)
MAX_TEXT = 500  # characters of a hub message kept: enough to act on, never a flood
_CODED = re.compile(r"([a-z][a-z0-9_.-]{1,63}):\s+(\S.*)", re.DOTALL)
# An id is sent back in request paths and stored: printable, one line, of a sane length
# (the hub's are 32 characters); any other is an unreadable answer, never stored.
HubId = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")
]


def hub_text(raw: object, limit: int = MAX_TEXT) -> str:
    """A text from the hub made safe to store and show: no key, no ``Bearer`` value, no
    terminal escapes or control characters, one line, at most ``limit`` characters."""
    return plain(str(raw), limit)


def epoch(stamp: object) -> float | None:
    """An ISO-8601 timestamp (``Z``, an offset, fractions or none) as epoch seconds."""
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None  # a time without a zone could be anywhere: not worth guessing
    return moment.timestamp()


class JobState(enum.StrEnum):
    """What a remote job's status means to the daemon."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    UNKNOWN = "unknown"  # a status outside the four: polled on, with a warning

    @property
    def running(self) -> bool:
        """Whether the hub may still change the job (unknown states count as running)."""
        return self not in (JobState.COMPLETED, JobState.FAILED)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FileInfo(_Model):
    """A file in the hub's store (an upload or a conversion output)."""

    file_id: HubId
    filename: str | None = None
    size: int | None = None
    created_at: str | None = None
    expires_at: str | None = None


class JobError(_Model):
    """Why a remote job failed (the hub's code and message, cleaned)."""

    code: str = "unknown"
    message: str = "no error details returned by the hub"
    request_id: str | None = None

    @field_validator("code", "message", mode="before")
    @classmethod
    def _clean(cls, value: object) -> object:
        return hub_text(value, 200) if value is not None else value


class Usage(_Model):
    """What the hub billed for a job: pages of the input."""

    input_pages: int | None = None


class RemoteJob(_Model):
    """A RenderOCR job as the hub reports it."""

    job_id: HubId
    file_id: HubId | None = None
    engine: str | None = None
    status: str
    progress: float | None = None
    output_file_id: HubId | None = None
    error: JobError | None = None
    created_at: str | None = None
    updated_at: str | None = None
    completed_at: str | None = None
    expires_at: str | None = None
    usage: Usage | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("error", mode="before")
    @classmethod
    def _error(cls, value: object) -> object:
        if isinstance(value, str):  # a gateway that sends the message alone
            coded = _CODED.fullmatch(value.strip())  # "code: message"
            return {"code": coded[1], "message": coded[2]} if coded else {"message": value}
        return value

    @field_validator("progress", mode="before")
    @classmethod
    def _progress(cls, value: object) -> object:
        # 0-1 as observed, or a percentage (0-100, int or float): both read as 0-1.
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
            return min(1.0, max(0.0, number / 100 if number > 1 else number))
        return None

    @property
    def state(self) -> JobState:
        """The status as one of the daemon's states."""
        try:
            return JobState(self.status)
        except ValueError:
            return JobState.UNKNOWN


def _shown(value: object) -> object:
    """A hub text that ``engines`` prints, cleaned (None and non-text left to the model)."""
    return hub_text(value, 200) if isinstance(value, str) else value


class Language(_Model):
    """A language an engine offers."""

    code: str
    display_name: str | None = None

    @field_validator("display_name", mode="before")
    @classmethod
    def _clean(cls, value: object) -> object:
        return _shown(value)


class Conversion(_Model):
    """One input format to output format pair an engine offers."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    from_: str = Field(alias="from")
    to: str


class Engine(_Model):
    """A RenderOCR engine with its languages and conversions (None: not listed)."""

    id: str
    display_name: str | None = None
    description: str | None = None
    supported_conversions: list[Conversion] | None = None
    supported_languages: list[Language] | None = None

    @field_validator("display_name", "description", mode="before")
    @classmethod
    def _clean(cls, value: object) -> object:
        return _shown(value)


def read(model: type[_M], body: Any, what: str) -> _M:
    """``body`` as ``model``; ``HubUnavailable`` (retried) when it does not fit."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        # A 2xx body we cannot read: most likely a proxy or a gateway hiccup.
        detail = hub_text(exc.errors()[0].get("msg", "invalid"), 200)
        raise HubUnavailable(f"{what}: unreadable answer ({detail})", code="bad_response") from exc


def items(body: Any) -> list[Any] | None:
    """The list a listing holds: under ``data``, under the only list-valued key, or the
    body itself; None when there is no such list."""
    if isinstance(body, list):
        return body
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("data"), list):
        return list(body["data"])
    lists = [value for value in body.values() if isinstance(value, list)]
    return list(lists[0]) if len(lists) == 1 else None


def read_list(model: type[_M], body: Any, what: str) -> list[_M]:
    """Every item of a listing as ``model`` (items that do not fit are skipped)."""
    found = items(body)
    if found is None:
        raise HubUnavailable(f"{what}: unreadable answer (no list in it)", code="bad_response")
    parsed = []
    for item in found:
        try:
            parsed.append(model.model_validate(item))
        except ValidationError:
            continue  # one odd entry must not hide the others
    return parsed


def read_engines(body: Any) -> list[Engine] | None:
    """The engine list in any of its plausible shapes; None when it cannot be read."""
    found = items(body)
    if found is None:
        return None
    engines = []
    for item in found:
        if isinstance(item, str):
            engines.append(Engine(id=item))
            continue
        try:
            engines.append(Engine.model_validate(item))
        except ValidationError:
            return None
    return engines
