"""The emulator's runtime knobs: how the hub misbehaves and how its answers are shaped.

Three groups share one flat namespace of knob names: ``Faults`` (requests the gateway
loses, refuses or limits), ``Storage`` (output files and downloads) and ``Variants`` (the
shape of answers). ``Knobs`` holds one of each; ``Knobs.updated`` takes a mapping of knob
names to JSON values (``POST /_emulator/faults``), checks every one and names a bad knob or
value in its ValueError. Each field carries a ``Knob`` in its metadata: the kind of value
(which decides how it is checked and parsed from the command line) and its ``--help`` text.
Every default is the emulator's behaviour before the knob existed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self

ROUTES = (
    "GET /files",
    "POST /files",
    "GET /files/{file_id}",
    "GET /files/{file_id}/content",
    "POST /uploads",
    "PUT /uploads/{file_id}",
    "GET /renderocr/engines",
    "POST /renderocr/jobs",
    "GET /renderocr/jobs",
    "GET /renderocr/jobs/{job_id}",
)
"""The API routes as the ledger names them ("METHOD /template")."""

JOB_STATUSES = ("queued", "processing", "completed", "failed")
OMITTABLE_FIELDS = ("completed_at", "expires_at", "usage")
GIB = 1024**3

Kind = Literal[
    "fraction",  # a number from 0 to 1
    "seconds",  # a finite number >= 0
    "interval",  # a finite number > 0
    "signed",  # any finite number
    "count",  # a whole number >= 0
    "flag",  # true or false
    "choice",  # one of ``choices``
    "subset",  # a list of some of ``choices``
    "ttl",  # null (the build setting) or a number > 0
    "route",  # "" (none) or one of ROUTES
    "word",  # letters, digits and ._:- ; may be empty
    "outage",  # false, true (until cleared) or seconds from now
]


@dataclass(frozen=True)
class Knob:
    """What a knob holds and what ``--help`` says of it."""

    kind: Kind
    help: str
    choices: tuple[Any, ...] = ()


def knob(default: Any, kind: Kind, text: str, choices: tuple[Any, ...] = ()) -> Any:
    """A dataclass field that is a knob; ``text`` is its help."""
    return field(default=default, metadata={"knob": Knob(kind, text, choices)})


def _spec(item: dataclasses.Field[Any]) -> Knob:
    spec = item.metadata["knob"]
    assert isinstance(spec, Knob)
    return spec


# -- checking values -------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z0-9_.:-]{0,100}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(name: str, value: object, low: float | None, what: str) -> float:
    if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be {what}, got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if low is not None and number < low:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def _check_choice(name: str, spec: Knob, value: object) -> object:
    for choice in spec.choices:
        if value == choice and type(value) is type(choice):
            return value
    options = ", ".join(repr(c) for c in spec.choices)
    raise ValueError(f"{name} must be one of {options}; got {value!r}")


def _check_subset(name: str, spec: Knob, value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(v in spec.choices for v in value):
        options = ", ".join(spec.choices)
        raise ValueError(f"{name} must be a list of some of {options}; got {value!r}")
    return tuple(dict.fromkeys(value))


def _check_text(name: str, spec: Knob, value: object) -> str:
    if spec.kind == "route":
        if value != "" and value not in ROUTES:
            raise ValueError(f"{name} must be '' or one of {', '.join(ROUTES)}; got {value!r}")
    elif not isinstance(value, str) or not _WORD.fullmatch(value):
        raise ValueError(f"{name} must be a word of letters, digits and ._:- ; got {value!r}")
    return str(value)


def _check_fraction(name: str, spec: Knob, value: object) -> object:
    if _number(name, value, 0.0, "between 0 and 1") > 1:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return value  # an int stays an int, as given


def _check_seconds(name: str, spec: Knob, value: object) -> object:
    _number(name, value, 0.0, "a finite number of seconds >= 0")
    return value


def _check_signed(name: str, spec: Knob, value: object) -> object:
    _number(name, value, None, "a finite number of seconds")
    return value


def _check_interval(name: str, spec: Knob, value: object) -> object:
    if _number(name, value, 0.0, "a number of seconds > 0") == 0:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return value


def _check_count(name: str, spec: Knob, value: object) -> object:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    return value


def _check_flag(name: str, spec: Knob, value: object) -> object:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _check_ttl(name: str, spec: Knob, value: object) -> object:
    if value is not None and _number(name, value, 0.0, "null or seconds > 0") == 0:
        raise ValueError(f"{name} must be null or a number of seconds > 0, got {value!r}")
    return value


def _check_outage(name: str, spec: Knob, value: object) -> object:
    if not isinstance(value, bool):
        _number(name, value, 0.0, "false, true or a number of seconds >= 0")
    return value


_CHECKS: dict[Kind, Callable[[str, Knob, object], object]] = {
    "fraction": _check_fraction,
    "seconds": _check_seconds,
    "interval": _check_interval,
    "signed": _check_signed,
    "count": _check_count,
    "flag": _check_flag,
    "choice": _check_choice,
    "subset": _check_subset,
    "ttl": _check_ttl,
    "route": _check_text,
    "word": _check_text,
    "outage": _check_outage,
}


def check(name: str, spec: Knob, value: object) -> object:
    """Return ``value`` (lists made tuples) if it suits the knob, else raise ValueError."""
    return _CHECKS[spec.kind](name, spec, value)


# -- the groups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """A frozen set of knobs, each checked when the group is made."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = check(item.name, _spec(item), getattr(self, item.name))
            object.__setattr__(self, item.name, value)  # lists become tuples

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The knob names of this group."""
        return tuple(item.name for item in dataclasses.fields(cls))

    def updated(self, changes: Mapping[str, object]) -> Self:
        """Return a copy with ``changes`` applied; ValueError names a bad knob or value."""
        known = {item.name: item for item in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown knob {name!r}; known: {', '.join(ALL_KNOBS)}")
            values[name] = check(name, _spec(known[name]), value)
        return dataclasses.replace(self, **values)

    def to_json(self) -> dict[str, Any]:
        """The knobs as a JSON object."""
        return {item.name: _jsonable(getattr(self, item.name)) for item in dataclasses.fields(self)}


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Faults(_Group):
    """Request faults: what the gateway loses, refuses or limits.

    The three request rates share one draw per request, so their sum cannot exceed 1.
    """

    error_rate: float = knob(0.0, "fraction", "fraction of requests answered 500, 502 or 503")
    rate_limit_rate: float = knob(
        0.0, "fraction", "fraction of requests answered 429 with Retry-After: retry_after"
    )
    retry_after: float = knob(1.0, "seconds", "seconds, for injected 429s")
    drop_rate: float = knob(0.0, "fraction", "fraction of connections cut without a response")
    job_failure_rate: float = knob(
        0.0, "fraction", "fraction of jobs that end failed with upstream_service_error"
    )
    latency: float = knob(0.0, "seconds", "seconds added to every authenticated-route response")
    stall_downloads: int = knob(
        0, "count", "upcoming downloads that send half the body, then stall"
    )
    files_rate_limit: int = knob(
        0, "count", "requests per minute per key on /files routes; 0 = off"
    )
    requests_per_minute: int = knob(
        0, "count", "requests per minute per key on every authenticated route; 0 = off"
    )
    retry_after_format: str = knob(
        "seconds",
        "choice",
        "how every 429 gives Retry-After: seconds, an HTTP date, or not at all",
        ("seconds", "http_date", "absent"),
    )
    lose_create_replies: int = knob(
        0, "count", "upcoming POST /renderocr/jobs that create the job, then cut the connection"
    )
    drop_create_requests: int = knob(
        0, "count", "upcoming POST /renderocr/jobs cut before any job is made"
    )
    drop_create_after_failure: int = knob(
        0,
        "count",
        "after a job fails, cut this many of the next creates for the same upload "
        "filename before any job is made; 0 = off",
    )
    outage: bool | float = knob(
        False, "outage", "an outage: seconds from now, or true ('forever') until cleared"
    )
    outage_mode: str = knob(
        "drop",
        "choice",
        "what an outage does: cut connections, answer 503, or a 502 HTML gateway page",
        ("drop", "503", "html502"),
    )
    outage_spares_engines: bool = knob(
        False, "flag", "keep the public engine list up during an outage"
    )
    refuse_route: str = knob(
        "", "route", "a route (e.g. 'POST /renderocr/jobs') refused with refuse_status; '' = none"
    )
    refuse_status: int = knob(
        402, "choice", "402 (credit used up) or 403 (not in the plan) for refuse_route", (402, 403)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.error_rate + self.rate_limit_rate + self.drop_rate > 1.0:
            raise ValueError("error_rate + rate_limit_rate + drop_rate must not exceed 1")


@dataclass(frozen=True)
class Storage(_Group):
    """Output files and downloads: lag, expiry, redirects, encodings and hostile bodies."""

    output_delay: float = knob(
        0.0, "seconds", "a completed job's output answers 404 for this long after completion"
    )
    output_missing: bool = knob(False, "flag", "completed jobs' outputs always answer 404")
    output_ttl: float | None = knob(
        None, "ttl", "seconds an output lives after completion; null = the build setting (24 h)"
    )
    job_ttl: float | None = knob(
        None, "ttl", "seconds a job lives after completion; null = the build setting (3 days)"
    )
    expired_status: int = knob(
        404, "choice", "status for an expired file or job: 404 or 410", (404, 410)
    )
    download_mode: str = knob(
        "normal",
        "choice",
        "normal; endless (bytes for ever, no length); trickle (a huge Content-Length, one "
        "byte every trickle_interval s); oversize (oversize_bytes past the declared length); "
        "unsized (no length, oversize_bytes more than the file)",
        ("normal", "endless", "trickle", "oversize", "unsized"),
    )
    trickle_interval: float = knob(5.0, "interval", "seconds between the bytes of a trickle")
    oversize_bytes: int = knob(1024 * 1024, "count", "extra bytes of oversize and unsized bodies")
    download_gzip: bool = knob(
        False, "flag", "gzip downloads (Content-Encoding: gzip, compressed Content-Length)"
    )
    download_gzip_bomb: bool = knob(
        False, "flag", "answer downloads with a gzip body that inflates to gzip_bomb_bytes"
    )
    gzip_bomb_bytes: int = knob(GIB, "count", "inflated size of a gzip-bomb download")
    download_redirect: bool = knob(
        False, "flag", "answer downloads with a 302 to /_storage/<token> on storage_host"
    )
    storage_host: str = knob(
        "", "word", "host name of redirects; '' = localhost, or 127.0.0.1 if called as localhost"
    )
    output_bomb: str = knob(
        "none",
        "choice",
        "outputs of jobs completing from now on: none; deep_xml (main part nests bomb_depth "
        "elements); zeros (a member of bomb_bytes zeros)",
        ("none", "deep_xml", "zeros"),
    )
    bomb_depth: int = knob(10_000_000, "count", "element depth of a deep_xml output bomb")
    bomb_bytes: int = knob(4 * GIB, "count", "inflated size of a zeros output bomb's member")


@dataclass(frozen=True)
class Variants(_Group):
    """Answer shapes: status codes, job and engine bodies, error bodies, ids and padding."""

    create_status: int = knob(202, "choice", "status of POST /renderocr/jobs", (200, 201, 202))
    upload_status: int = knob(
        201, "choice", "status of POST /files and POST /uploads", (200, 201, 202)
    )
    extra_fields: bool = knob(False, "flag", "add unknown fields to job and file bodies")
    progress_scale: str = knob(
        "fraction",
        "choice",
        "job progress as 0-1, as an int 0-100 or as a float 0-100",
        ("fraction", "percent_int", "percent_float"),
    )
    timestamp_style: str = knob(
        "z",
        "choice",
        "timestamps as 2026-04-13T05:32:04Z, with microseconds, or with +00:00",
        ("z", "fraction_z", "offset"),
    )
    timestamp_skew: float = knob(
        0.0, "signed", "seconds added to every timestamp and HTTP date the hub reports"
    )
    omit_fields: tuple[str, ...] = knob(
        (), "subset", "job fields left out: completed_at, expires_at, usage", OMITTABLE_FIELDS
    )
    status_case: str = knob(
        "lower", "choice", "job status in lower or upper case", ("lower", "upper")
    )
    extra_status: str = knob(
        "", "word", "a status reported instead of 'processing' (e.g. running); '' = off"
    )
    error_as_string: bool = knob(False, "flag", "a failed job's error as a string, not an object")
    usage_on_failure: bool = knob(False, "flag", "failed jobs report usage too")
    engines_shape: str = knob(
        "objects",
        "choice",
        "engine list: objects; strings; other_wrapper (not under 'data'); no_languages; "
        "no_conversions; empty; auth_required (needs the key)",
        (
            "objects",
            "strings",
            "other_wrapper",
            "no_languages",
            "no_conversions",
            "empty",
            "auth_required",
        ),
    )
    error_body: str = knob(
        "default",
        "choice",
        "backend error bodies: default {code,message,request_id}; problem+json; nested "
        "{error:{code,message}}; {message}; plain text; HTML",
        ("default", "problem", "nested", "message", "text", "html"),
    )
    missing_input_status: int = knob(
        400, "choice", "status when a job names an unknown or expired file_id", (400, 404)
    )
    missing_input_code: str = knob(
        "invalid_file_id", "word", "error code when a job names an unknown or expired file_id"
    )
    list_limit: int = knob(0, "count", "GET /files and GET /renderocr/jobs list only the newest N")
    wait_mode: str = knob(
        "honour",
        "choice",
        "?wait= long polls honoured, ignored (answered at once) or rejected with 400",
        ("honour", "ignore", "reject"),
    )
    echo_auth: bool = knob(
        False, "flag", "error bodies repeat the request's Authorization header verbatim"
    )
    hostile_ids: bool = knob(
        False, "flag", "new ids contain '..', '/' and '%' (clients must percent-encode them)"
    )
    json_padding: int = knob(
        0, "count", "bytes of spaces padding job and list answers in an extra field"
    )
    gzip_json: bool = knob(False, "flag", "gzip job and list answers (Content-Encoding: gzip)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.extra_status in JOB_STATUSES:
            raise ValueError(f"extra_status must not be one of {', '.join(JOB_STATUSES)}")
        if not self.missing_input_code:
            raise ValueError("missing_input_code must not be empty")


GROUPS: dict[str, type[_Group]] = {"faults": Faults, "storage": Storage, "variants": Variants}
ALL_KNOBS = tuple(name for group in GROUPS.values() for name in group.names())
_GROUP_OF = {name: key for key, group in GROUPS.items() for name in group.names()}


@dataclass(frozen=True)
class Knobs:
    """All knobs; a flat mapping of names in, a flat JSON object out."""

    faults: Faults = field(default_factory=Faults)
    storage: Storage = field(default_factory=Storage)
    variants: Variants = field(default_factory=Variants)

    def updated(self, changes: Mapping[str, object]) -> Knobs:
        """Apply ``changes`` (all or none); ValueError names a bad knob or value."""
        split: dict[str, dict[str, object]] = {key: {} for key in GROUPS}
        for name, value in changes.items():
            key = _GROUP_OF.get(name)
            if key is None:
                raise ValueError(f"unknown knob {name!r}; known: {', '.join(ALL_KNOBS)}")
            split[key][name] = value
        return Knobs(
            self.faults.updated(split["faults"]),
            self.storage.updated(split["storage"]),
            self.variants.updated(split["variants"]),
        )

    def to_json(self) -> dict[str, Any]:
        """Every knob by name."""
        return {**self.faults.to_json(), **self.storage.to_json(), **self.variants.to_json()}


# -- the command line ------------------------------------------------------------------------


def _cli_number(kind: Kind) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            value: object = int(text) if kind == "count" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        try:
            return check("the value", Knob(kind, ""), value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _cli_outage(text: str) -> bool | float:
    if text.strip().lower() in ("forever", "true"):
        return True
    parse = _cli_number("seconds")
    return float(parse(text))  # type: ignore[arg-type]


def _cli_subset(spec: Knob) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        try:
            return _check_subset("value", spec, names)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _cli_word(spec: Knob) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return _check_text("value", spec, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _add_option(group: argparse._ArgumentGroup, name: str, spec: Knob, default: object) -> None:
    flag = "--" + name.replace("_", "-")
    plain = spec.help.replace("%", "%%")  # argparse formats help with %
    text = f"{plain} (default: {_jsonable(default)!r})"
    if spec.kind == "flag":
        group.add_argument(flag, dest=name, action="store_const", const=True, help=plain)
    elif spec.kind == "choice":
        kind = type(spec.choices[0])
        group.add_argument(flag, dest=name, type=kind, choices=spec.choices, help=text)
    elif spec.kind == "subset":
        group.add_argument(flag, dest=name, type=_cli_subset(spec), metavar="A,B", help=text)
    elif spec.kind == "outage":
        group.add_argument(flag, dest=name, type=_cli_outage, metavar="SECONDS|forever", help=plain)
    elif spec.kind in ("word", "route"):
        group.add_argument(flag, dest=name, type=_cli_word(spec), help=text)
    else:
        metavar = "N" if spec.kind == "count" else "SECONDS"
        group.add_argument(flag, dest=name, type=_cli_number(spec.kind), metavar=metavar, help=text)


_GROUP_TITLES = {
    "faults": "request faults (change at run time with POST /_emulator/faults)",
    "storage": "outputs and downloads (change at run time with POST /_emulator/faults)",
    "variants": "answer shapes (change at run time with POST /_emulator/faults)",
}


def add_options(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> None:
    """Add a ``--knob-name`` option for every knob not in ``skip``; each defaults to None."""
    for key, group_type in GROUPS.items():
        group = parser.add_argument_group(_GROUP_TITLES[key])
        for item in dataclasses.fields(group_type):
            if item.name not in skip:
                _add_option(group, item.name, _spec(item), item.default)


def changes_from(args: argparse.Namespace) -> dict[str, object]:
    """The knobs given on the command line (options left at None are not changes)."""
    given = {name: getattr(args, name, None) for name in ALL_KNOBS}
    return {name: value for name, value in given.items() if value is not None}
