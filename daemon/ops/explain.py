"""Explain: why a file is, or is not, being processed (``ldx-hotfolder explain PATH``).

The running daemon's memory is out of the command line's reach, so the answer is
derived from what anyone can look at: the file system (``lstat`` of the path and of
every folder on the way, a safe look at the content), the state table (the path's
latest job, duplicates by content, inputs noted as stalled) and the configuration.
``gather`` collects those facts (the only I/O here); ``explain`` turns them into
sentences and a one-word state, a pure function with the time passed in.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from daemon.config import Settings
from daemon.errors import BudgetReached, JobFailed
from daemon.fs import fs_path, is_escaped, stored_path
from daemon.inbox.filters import DEFAULT_IGNORE, NameFilter
from daemon.inbox.inputs import Inspection, inspect_input, open_input, sha256_of, signature_of
from daemon.inbox.stability import Signature
from daemon.jobs.model import Job, Status, Waiting
from daemon.jobs.store import Store
from daemon.jobs.views import Views
from daemon.ops.health import age_text, read_heartbeat, verdict
from daemon.outbox.layout import error_file_for

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass(frozen=True)
class Facts:
    """Everything known about one path."""

    given: str
    rel: str | None = None  # stored form, relative to the inbox; None when outside it
    kind: str = "missing"  # "missing", "file", "folder" or a phrase from _KINDS
    link_target: str | None = None
    blocked_by: str | None = None  # a folder on the way that is a link or not a folder
    ignored: tuple[str, str] | None = None  # (name, pattern)
    ignored_builtin: bool = True
    signature: Signature | None = None
    links: int = 1
    mtime: float | None = None
    inspection: Inspection | None = None
    unreadable: str | None = None
    job: Job | None = None
    same_content: tuple[Job, bool] | None = None  # a completed job with the same bytes
    waiting: Waiting | None = None
    files_inside: int | None = None
    held_back: str | None = None  # why the running daemon starts no new work now


@dataclass(frozen=True)
class Rules:
    """The settings an explanation quotes."""

    inbox: Path
    outbox: Path
    quiet_period: float
    rescan_interval: float
    stalled_after: float
    incomplete_timeout: float
    allow_hardlinks: bool
    on_duplicate: str

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        """The rules of ``settings``."""
        return cls(
            settings.inbox.absolute(),
            settings.outbox.absolute(),
            settings.quiet_period,
            settings.rescan_interval,
            settings.stalled_after,
            settings.incomplete_timeout,
            settings.allow_hardlinks,
            settings.on_duplicate,
        )


@dataclass(frozen=True)
class Explanation:
    """A one-word state and the sentences that explain it."""

    path: str
    state: str
    lines: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        """The ``explain --json`` shape."""
        return {"path": self.path, "state": self.state, "reasons": list(self.lines)}


# -- locating the path ----------------------------------------------------------------


def locate(inbox: Path, given: str, cwd: Path) -> str | None:
    """The path relative to the inbox (as the filesystem spells it), or None if outside.

    An absolute path, or one that lies in the inbox from ``cwd``, is taken as it is;
    any other relative path is relative to the inbox.
    """
    roots = {os.path.normpath(inbox), os.path.realpath(inbox)}
    absolute = given if os.path.isabs(given) else os.path.join(cwd, given)
    candidate = os.path.normpath(absolute)
    for root in roots:
        if candidate == root:
            return ""
        if candidate.startswith(root.rstrip("/") + "/"):
            return candidate[len(root.rstrip("/")) + 1 :]
    if os.path.isabs(given):
        return None
    rel = os.path.normpath(given)
    return None if rel == ".." or rel.startswith("../") else ("" if rel == "." else rel)


# -- gathering facts (I/O) ------------------------------------------------------------


def gather(settings: Settings, store: Store, given: str, cwd: Path) -> Facts:
    """Collect the facts about ``given`` from the file system and the table."""
    rules = Rules.of(settings)
    fs_rel = locate(rules.inbox, given, cwd)
    if fs_rel is None:
        return Facts(given)
    if not os.path.lexists(rules.inbox / fs_rel) and is_escaped(fs_rel):
        fs_rel = fs_path(fs_rel)  # given in its stored (escaped) form
    rel = stored_path(fs_rel)
    name_filter = NameFilter.with_extra(settings.ignore)
    ignored = name_filter.ignored_part(fs_rel) if fs_rel else None
    facts = Facts(
        given,
        rel=rel,
        ignored=ignored,
        ignored_builtin=ignored is None or ignored[1] in DEFAULT_IGNORE,
        blocked_by=_blocked_by(rules.inbox, fs_rel),
        job=Views(store).latest_for_path(rel) if rel else None,
        waiting=next(iter(Views(store).waiting(rel)), None) if rel else None,
    )
    if facts.blocked_by is not None:
        return facts
    return _with_file_facts(facts, rules, store, settings)


def _blocked_by(inbox: Path, fs_rel: str) -> str | None:
    folder = inbox
    for part in [p for p in fs_rel.split("/") if p][:-1]:
        folder = folder / part
        try:
            mode = folder.lstat().st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            return f"the folder {stored_path(part)!r} on the way is a symbolic link"
        if not stat.S_ISDIR(mode):
            return f"{stored_path(part)!r} on the way is not a folder"
    return None


def _with_file_facts(facts: Facts, rules: Rules, store: Store, settings: Settings) -> Facts:
    path = rules.inbox / fs_path(facts.rel or "")
    try:
        st = path.lstat()
    except OSError:
        return facts
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return _replace(facts, kind="folder", files_inside=_count_files(path))
    for test, phrase in _KINDS:
        if test(mode):
            target = os.readlink(path) if stat.S_ISLNK(mode) else None
            return _replace(facts, kind=phrase, link_target=target)
    if not stat.S_ISREG(mode):
        return _replace(facts, kind="not a regular file")
    facts = _replace(
        facts,
        kind="file",
        signature=signature_of(st),
        links=st.st_nlink,
        mtime=st.st_mtime,
    )
    return _with_content(facts, rules, store, settings)


def _with_content(facts: Facts, rules: Rules, store: Store, settings: Settings) -> Facts:
    rel = facts.rel or ""
    job = facts.job
    if job is not None and _version(job) == facts.signature and job.sha256 and job.output:
        same = store.converted_before(
            job.sha256, job.engine, job.language, job.output_format, job.id
        )
        return _replace(facts, same_content=same)
    if facts.links > 1 and not rules.allow_hardlinks:
        return facts  # never read a refused hard link
    try:
        found = inspect_input(rules.inbox, rel, allow_hardlinks=True)
        digest = _sha256(rules.inbox, rel) if found.input_format and not found.problem else None
    except JobFailed as exc:
        return _replace(facts, unreadable=exc.message)
    except OSError as exc:
        return _replace(facts, unreadable=exc.strerror or str(exc))
    same = None
    if digest is not None:
        hub = settings.hub
        same = store.converted_before(digest, hub.engine, hub.language, hub.output_format, -1)
    return _replace(facts, inspection=found, same_content=same)


def _sha256(inbox: Path, rel: str) -> str:
    with open_input(inbox, rel, allow_hardlinks=True) as fd:
        return sha256_of(fd)


def _count_files(folder: Path) -> int:
    count = 0
    for _, _, files in os.walk(folder):
        count += len(files)
    return count


def _replace(facts: Facts, **changes: object) -> Facts:
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


def _version(job: Job) -> Signature:
    return Signature(job.size, job.mtime_ns, job.inode)


# -- explaining (pure) ------------------------------------------------------------------


def explain(facts: Facts, rules: Rules, now: float) -> Explanation:
    """Turn the facts into a state and sentences."""
    shown = facts.rel if facts.rel else facts.given
    state, lines = _explain(facts, rules, now)
    if facts.waiting is not None and state in ("waiting", "incomplete", "empty", "unreadable"):
        waited = age_text(now - facts.waiting.since)
        lines.append(f"It shows as stalled in `status` (waiting for {waited}).")
        state = "unreadable" if state == "unreadable" else "stalled"  # the fix differs
    return Explanation(shown, state, tuple(lines))


def _explain(facts: Facts, rules: Rules, now: float) -> tuple[str, list[str]]:
    placed = _placement(facts, rules)
    if placed is not None:
        return placed
    if facts.kind == "missing":
        return _missing(facts, rules)
    if facts.kind == "folder":
        return "folder", [
            f"A folder; its {facts.files_inside} file(s) are inputs one by one "
            "(explain a file in it to know more)."
        ]
    if facts.kind != "file":
        return _special(facts)
    return _regular(facts, rules, now)


def _placement(facts: Facts, rules: Rules) -> tuple[str, list[str]] | None:
    """Whether where the path lies already rules it out."""
    if facts.rel is None:
        return "outside", [f"It is not inside the inbox {rules.inbox}; only files there count."]
    if facts.rel == "":
        return "inbox", [f"This is the inbox itself ({rules.inbox})."]
    if facts.ignored is not None:
        return "ignored", [_ignored(facts)]
    if facts.blocked_by is not None:
        return "not_followed", [
            f"Never read: {facts.blocked_by}, and links are never followed out of the inbox."
        ]
    return None


def _ignored(facts: Facts) -> str:
    name, pattern = facts.ignored or ("", "")
    origin = "a built-in ignore rule" if facts.ignored_builtin else "your `ignore` setting"
    where = "its name" if facts.rel and name == facts.rel.rsplit("/", 1)[-1] else f"{name!r}"
    return f"Ignored: {where} matches {pattern!r}, {origin}; it is never an input."


def _special(facts: Facts) -> tuple[str, list[str]]:
    lines = [f"Never read: it is {facts.kind}; only regular files are inputs."]
    if facts.link_target is not None:
        lines.append(
            f"It points to {facts.link_target!r}; links are never followed, so nothing "
            "outside the inbox is ever read through one."
        )
    return "not_followed" if facts.link_target is not None else "not_a_file", lines


def _missing(facts: Facts, rules: Rules) -> tuple[str, list[str]]:
    if facts.job is None:
        return "missing", ["It does not exist, and the state table has no job for this path."]
    state, lines = _job_lines(facts.job, rules, facts)
    lines.insert(0, "It is no longer in the inbox; its latest job:")
    return state, lines


def _regular(facts: Facts, rules: Rules, now: float) -> tuple[str, list[str]]:
    job = facts.job
    if job is not None and facts.signature == _version(job):
        return _job_lines(job, rules, facts)
    lines: list[str] = []
    if job is not None:
        lines.append(
            f"It changed since job #{job.id} took it ({job.status.value}); "
            "the new version is a new input."
        )
    else:
        lines.append("It is not in the state table yet.")
    state, more = _untaken(facts, rules, now)
    return state, lines + more


def _untaken(facts: Facts, rules: Rules, now: float) -> tuple[str, list[str]]:
    if facts.links > 1 and not rules.allow_hardlinks:
        return "will_fail", [
            f"It has {facts.links} hard links, so it will be refused unread (code hard_link): "
            "a hard link can show a file from outside the inbox. Set allow_hardlinks = true "
            "to accept such files."
        ]
    unreadable = _unreadable_lines(facts, rules)
    if unreadable:
        return "unreadable", unreadable
    quiet = max(0.0, now - (facts.mtime or now))
    size = facts.signature.size if facts.signature else 0
    changed = f"It last changed {age_text(quiet)} ago"
    if size == 0:
        return "empty", [
            f"{changed} and is empty (0 bytes): a placeholder. It waits for content, and "
            f"shows as stalled after {age_text(rules.stalled_after)}."
        ]
    found = facts.inspection
    if found is not None and found.problem is not None:
        return "incomplete", [
            f"{changed} and is not complete: {found.problem}. It waits for the rest and "
            f"fails with that reason once unchanged for {age_text(rules.incomplete_timeout)}."
        ]
    if found is not None and found.input_format is None:
        return "will_fail", [
            f"It will fail without any call to the hub: unsupported type: looks like "
            f"{found.described} (accepted: PDF, TIFF, JPEG, PNG, BMP)."
        ]
    return "waiting", [_when_taken(changed, quiet, rules), *_duplicate_note(facts, rules)]


def _unreadable_lines(facts: Facts, rules: Rules) -> list[str]:
    """What keeps a file from being read: by this command, or by the daemon as it noted
    (its user may differ from the one asking, who may well read the file)."""
    lines = []
    if facts.unreadable is not None:
        lines.append(f"It cannot be read safely: {facts.unreadable}.")
    if facts.waiting is not None and facts.waiting.code == "unreadable":
        lines.append(
            f"The daemon cannot read it: {facts.waiting.reason}. It fails with code "
            f"unreadable once unchanged for {age_text(rules.incomplete_timeout)}; "
            f"once readable it is taken at the next full rescan (every "
            f"{age_text(rules.rescan_interval)})."
        )
    return lines


def _when_taken(changed: str, quiet: float, rules: Rules) -> str:
    if quiet < rules.quiet_period:
        return (
            f"{changed}; it will be taken after the quiet period "
            f"({rules.quiet_period:g} s without change)."
        )
    return (
        f"{changed}, longer than the quiet period ({rules.quiet_period:g} s): a running "
        "daemon takes it within moments, or at the next full rescan (every "
        f"{age_text(rules.rescan_interval)}) if its events were lost. Is the daemon running?"
    )


def _duplicate_note(facts: Facts, rules: Rules) -> list[str]:
    if facts.same_content is None or rules.on_duplicate == "convert":
        return []
    earlier, current = facts.same_content
    if rules.on_duplicate == "skip":
        action = "it will be skipped (on_duplicate = skip)"
    elif current:
        action = f"its output {earlier.output} will be copied (on_duplicate = reuse)"
    else:
        action = "its output is gone or replaced, so it will be converted again"
    return [f"Same content as {earlier.path} (job #{earlier.id}): {action}."]


def _job_lines(job: Job, rules: Rules, facts: Facts) -> tuple[str, list[str]]:
    if job.status is Status.COMPLETED:
        return "completed", _completed(job, rules, facts)
    if job.status is Status.FAILED:
        return "failed", _failed(job, rules)
    if job.status is Status.QUEUED:
        line = f"Queued as job #{job.id} since {_stamp(job.created_at)}, waiting for a free slot"
        if job.error_message:
            line += f"; last problem: {job.error_message}"
        return "queued", [line + ".", *_held_back(facts, job)]
    line = f"Processing as job #{job.id}: stage {job.stage.value}"
    if job.remote_job_id:
        line += f", hub job {job.remote_job_id}"
    if job.next_attempt_at and job.error_message:
        line += f"; retrying at {_stamp(job.next_attempt_at)} after: {job.error_message}"
    return "processing", [line + ".", *_held_back(facts, job)]


def _held_back(facts: Facts, job: Job) -> list[str]:
    if not facts.held_back or job.error_code == BudgetReached.code:  # said above
        return []
    return [f"The daemon starts no new work now: {facts.held_back}."]


def _completed(job: Job, rules: Rules, facts: Facts) -> list[str]:
    when = _stamp(job.finished_at or job.updated_at)
    same = facts.same_content[0] if facts.same_content else None
    converted = job.remote_job_id is not None or job.remote_file_id is not None
    if job.output is None:
        source = f" as {same.path} (job #{same.id})" if same else ""
        return [
            f"Completed on {when} without an output of its own: the same content was "
            f"converted before{source}, and on_duplicate = skip."
        ]
    lines = [f"Completed on {when}: output {rules.outbox / job.output} (job #{job.id})."]
    if job.error_code == "input_kept" and job.error_message:
        lines.append(f"But {job.error_message}.")
    if converted:
        lines.append(
            f"Converted by the hub (hub job {job.remote_job_id}) with engine {job.engine}, "
            f"language {job.language}, format {job.output_format}, chosen by "
            f"{job.rule or 'the [hub] defaults'}."
        )
    elif same is not None:
        lines.append(
            f"Its output is a copy of the output of {same.path} (job #{same.id}), which "
            "had the same content: the hub was not paid twice (on_duplicate = reuse)."
        )
    return lines


def _failed(job: Job, rules: Rules) -> list[str]:
    error_file = rules.outbox / error_file_for(job.path)
    return [
        f"Failed on {_stamp(job.finished_at or job.updated_at)} (job #{job.id}): "
        f"{job.error_message} [{job.error_code}].",
        f"The error file is {error_file}. Once the cause is fixed: "
        f"ldx-hotfolder retry {job.id} (or drop a corrected file under the same name).",
    ]


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def explain_path(
    settings: Settings, store: Store, given: str, cwd: Path, now: float
) -> Explanation:
    """Gather and explain in one call (what the command line runs), with what the
    running daemon's heartbeat says holds new work back (the page budget, the hub)."""
    facts = gather(settings, store, given, cwd)
    beat = read_heartbeat(settings.heartbeat_path)
    if beat is not None and verdict(beat, now, settings.stall_timeout)[0]:
        facts = _replace(facts, held_back=beat.paused or beat.holding_back)
    return explain(facts, Rules.of(settings), now)


# -- stalled inputs in ``status`` ---------------------------------------------------------


def waiting_json(item: Waiting) -> dict[str, object]:
    """The ``status --json`` shape of a stalled input."""
    since = datetime.fromtimestamp(item.since, UTC).isoformat(timespec="seconds")
    return {
        "path": item.path,
        "code": item.code,
        "reason": item.reason,
        "waiting_since": since.replace("+00:00", "Z"),
    }


def stalled_lines(items: list[Waiting], now: float) -> list[str]:
    """The ``status`` lines about inputs intake still waits on (none when there are none)."""
    if not items:
        return []
    lines = ["", "stalled in the inbox (not taken yet):"]
    for item in items:
        lines.append(f"  {item.path}: {item.reason} (waiting {age_text(now - item.since)})")
    return lines
