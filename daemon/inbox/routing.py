"""Routing rules: which engine, language, output format and input policy a file gets.

Sources, strongest first, field by field:

1. the first ``[[rules]]`` entry of the main configuration whose ``match`` glob matches
   the file's path relative to the inbox (the administrator's word is final);
2. the nearest ``.ldx-hotfolder.toml`` in the file's folder or a parent folder inside
   the inbox (for profiles set up by someone without access to the configuration);
3. the ``[hub]`` defaults (and ``on_success`` at the top level).

Matching and merging are pure functions; reading folder files is the caller's I/O.
A folder file is read like an input (``read_folder_file``): reached without links,
a regular file of at most 64 KiB, never blocking; anything else is refused with a
reason, and the files of its folder fail with it (``bad_folder_settings``).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemon import fs
from daemon.config import RouteFields, Rule
from daemon.errors import ConfigError, FolderFileError
from daemon.fs import fs_path

FOLDER_FILE = ".ldx-hotfolder.toml"
FOLDER_FILE_MAX = 64 * 1024  # bytes; a folder file holds a few settings


@dataclass(frozen=True)
class Route:
    """The settings one file is converted with, and where they came from."""

    engine: str
    language: str
    output_format: str
    on_success: str
    source: str  # e.g. "rules[2] invoices/**", "folder letters/.ldx-hotfolder.toml"


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a path glob: ``*`` and ``?`` stay in one folder, ``**`` spans folders."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.IGNORECASE)


def first_rule(rules: Sequence[Rule], rel_path: str) -> tuple[int, Rule] | None:
    """The first rule whose glob matches ``rel_path`` (1-based index), or None."""
    for index, rule in enumerate(rules, start=1):
        if glob_regex(rule.match).match(rel_path):
            return index, rule
    return None


def folder_files_for(rel_path: str) -> list[str]:
    """Folder-file paths that may apply to ``rel_path``, nearest first."""
    parts = rel_path.split("/")[:-1]
    return ["/".join([*parts[:n], FOLDER_FILE]) for n in range(len(parts), -1, -1)]


def route(
    rel_path: str,
    rules: Sequence[Rule],
    folder_fields: Callable[[str], RouteFields | None],
    defaults: dict[str, str],
) -> Route:
    """Merge rule, nearest folder file and defaults for ``rel_path``."""
    merged = dict(defaults)
    sources = []
    folder = next(
        ((p, f) for p in folder_files_for(rel_path) if (f := folder_fields(p)) is not None),
        None,
    )
    if folder is not None:
        merged.update(folder[1].given())
        sources.append(f"folder {folder[0]}")
    matched = first_rule(rules, rel_path)
    if matched is not None:
        index, rule = matched
        merged.update(rule.given())
        sources.insert(0, f"rules[{index}] {rule.match}")
    return Route(
        engine=merged["engine"],
        language=merged["language"],
        output_format=merged["output_format"],
        on_success=merged["on_success"],
        source=" + ".join(sources) or "defaults",
    )


def parse_folder_file(text: str, where: str) -> RouteFields:
    """Parse a ``.ldx-hotfolder.toml``; FolderFileError names the problem."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FolderFileError(f"{where} is not valid TOML: {exc}") from None
    try:
        return RouteFields(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise FolderFileError(f"{where}: {problems}") from None


def read_folder_file(inbox: Path, rel: str) -> RouteFields | None:
    """The folder file at ``inbox/rel`` (stored form), None when there is none;
    FolderFileError if it is bad, or anything but a small regular file.

    It is read as inputs are (``daemon.fs``): its folders walked by descriptor without
    links, the file itself opened with ``O_NOFOLLOW | O_NONBLOCK`` (a link to
    ``/dev/zero`` is refused, a FIFO never blocks) and read up to ``FOLDER_FILE_MAX``.
    """
    try:
        with fs.parent_of(inbox, fs_path(rel)) as (folder, name):
            data = _read_small(folder, name, rel)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FolderFileError(f"{rel} cannot be read safely: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FolderFileError(f"{rel} is not UTF-8 text: {exc.reason}") from None
    return parse_folder_file(text, rel)


def _read_small(folder: int, name: str, rel: str) -> bytes:
    """The bytes of a small regular file in an open folder, or FolderFileError."""
    _check_kind(fs.lstat_at(folder, name), rel)  # a FIFO or a device is never opened
    try:
        fd = fs.open_at(folder, name)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a link since it was looked at
            raise FolderFileError(f"{rel} is a symbolic link; {_ONLY_FILES}") from None
        raise
    try:
        _check_kind(os.fstat(fd), rel)
        data = os.read(fd, FOLDER_FILE_MAX + 1)
        while len(data) <= FOLDER_FILE_MAX and (more := os.read(fd, FOLDER_FILE_MAX)):
            data += more  # a file that grew past what fstat said is stopped at the cap
    finally:
        os.close(fd)
    if len(data) > FOLDER_FILE_MAX:
        raise FolderFileError(_too_big(rel))
    return data


_ONLY_FILES = "folder files are read only as regular files, never through a link"


def _check_kind(st: os.stat_result, rel: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise FolderFileError(f"{rel} is a symbolic link; {_ONLY_FILES}")
    if not stat.S_ISREG(st.st_mode):
        raise FolderFileError(f"{rel} is not a regular file (a FIFO, a device...); {_ONLY_FILES}")
    if st.st_size > FOLDER_FILE_MAX:
        raise FolderFileError(_too_big(rel))


def _too_big(rel: str) -> str:
    return (
        f"{rel} is larger than {FOLDER_FILE_MAX // 1024} KiB, more than a folder file "
        "needs; it is not read"
    )


_Key = tuple[int, int, int, int]  # what lstat says of a folder file: mode, inode, size, mtime


@dataclass(frozen=True)
class Offer:
    """What the hub offers: engine id → (languages, output formats), each None when the
    hub's list does not say (then any value is left to the hub's answer to each job)."""

    engines: dict[str, tuple[frozenset[str] | None, frozenset[str] | None]]

    def problems(self, engine: str, language: str, output_format: str) -> list[str]:
        """What in (engine, language, format) the hub does not offer, with the choices."""
        if engine not in self.engines:
            return [f"engine {engine!r} is not offered (valid: {_list(self.engines)})"]
        languages, formats = self.engines[engine]
        found = []
        if languages is not None and language not in languages:
            found.append(
                f"language {language!r} is not offered by {engine} (valid: {_list(languages)})"
            )
        if formats is not None and output_format not in formats:
            found.append(
                f"output format {output_format!r} is not offered by {engine} "
                f"(valid: {_list(formats)})"
            )
        return found


def _list(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def check_rules(rules: Sequence[Rule], defaults: dict[str, str], offer: Offer) -> list[str]:
    """Every problem of the defaults and the rules against what the hub offers."""
    found = [
        f"[hub]: {p}"
        for p in offer.problems(defaults["engine"], defaults["language"], defaults["output_format"])
    ]
    for index, rule in enumerate(rules, start=1):
        merged = {**defaults, **rule.given()}
        for problem in offer.problems(
            merged["engine"], merged["language"], merged["output_format"]
        ):
            found.append(f"rules[{index}] (match {rule.match!r}): {problem}")
    return found


def validate_routes(
    rules: Sequence[Rule], defaults: dict[str, str], engines: Sequence[Any] | None
) -> Offer | None:
    """The one check of ``[hub]`` and ``[[rules]]`` against the hub's engine list, shared
    by ``check`` and ``run``: the offer to check folder files against later, or None when
    the list is empty or unreadable (it is advice: the hub's answer to each job decides).
    ConfigError names every engine, language or format the hub does not offer."""
    if not engines:
        return None
    offer = offer_from_engines(engines)
    problems = check_rules(rules, defaults, offer)
    if problems:
        raise ConfigError("the hub does not offer what is configured: " + "; ".join(problems))
    return offer


class Router:
    """Routes inbox paths: rules, cached folder files, defaults, checked against the hub."""

    def __init__(
        self,
        inbox: Path,
        rules: Sequence[Rule],
        defaults: dict[str, str],
        *,
        archive_dir_set: bool = True,
    ) -> None:
        self.inbox = inbox
        self.rules = tuple(rules)
        self.defaults = dict(defaults)
        # Loading refuses "archive" without archive_dir in the configuration, but a folder
        # file is read later: without this the worker would silently keep its inputs.
        self.archive_dir_set = archive_dir_set
        self.offer: Offer | None = None  # set once the hub's engine list is known
        self._folder_cache: dict[str, tuple[_Key, RouteFields | str | None]] = {}

    def route(self, rel_path: str) -> tuple[Route, str | None]:
        """The route of ``rel_path`` and, when its folder file is bad, why."""
        problem: list[str] = []
        used: list[tuple[str, RouteFields]] = []  # the folder file route() took, if any

        def folder(rel: str) -> RouteFields | None:
            try:
                fields = self._folder_file(rel)
            except FolderFileError as exc:
                problem.append(str(exc))
                return None
            if fields is not None:
                used.append((rel, fields))
            return fields

        chosen = route(rel_path, self.rules, folder, self.defaults)
        if problem:
            return chosen, problem[0]
        if used and self._archives_without_dir(chosen, used[0][1]):
            return chosen, (
                f"folder {used[0][0]}: on_success = 'archive' needs archive_dir, "
                "which the daemon's configuration does not set"
            )
        # Rules are checked at start; a folder file's values only now, also under a rule.
        if self.offer is not None and used:
            found = self.offer.problems(chosen.engine, chosen.language, chosen.output_format)
            if found:
                return chosen, f"{chosen.source}: {'; '.join(found)}"
        return chosen, None

    def _archives_without_dir(self, chosen: Route, fields: RouteFields) -> bool:
        """Whether the folder file's on_success = 'archive' took effect with no archive_dir."""
        # A rule's on_success wins over the folder file's, and may well say "keep".
        return not self.archive_dir_set and fields.on_success == chosen.on_success == "archive"

    def _folder_file(self, rel: str) -> RouteFields | None:
        try:
            st = fs.lstat_below(self.inbox, fs_path(rel))
        except (OSError, ValueError):
            self._folder_cache.pop(rel, None)
            return None
        key = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._folder_cache.get(rel)
        if cached is None or cached[0] != key:
            try:
                cached = (key, read_folder_file(self.inbox, rel))
            except FolderFileError as exc:
                cached = (key, exc.message)  # the reason, kept: nothing is read again
            self._folder_cache[rel] = cached
        if isinstance(cached[1], str):
            raise FolderFileError(cached[1])
        return cached[1]


def offer_from_engines(engines: Iterable[Any]) -> Offer:
    """An ``Offer`` from the client's engine models (a part the list leaves out, or
    lists empty, is not checked)."""
    return Offer({engine.id: (_codes(engine), _targets(engine)) for engine in engines})


def _codes(engine: Any) -> frozenset[str] | None:
    listed = engine.supported_languages
    return frozenset(lang.code for lang in listed) if listed else None


def _targets(engine: Any) -> frozenset[str] | None:
    listed = engine.supported_conversions
    return frozenset(conv.to for conv in listed) if listed else None
