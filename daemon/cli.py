"""Command line: ``ldx-hotfolder`` and its subcommands.

Each subcommand is one small function taking the parsed arguments and returning an exit
code. Configuration errors print one message naming the problem and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.config import Settings, check_folders, config_path, load_settings, resolve_api_key
from daemon.errors import AlreadyRunning, AuthRejected, ConfigError, LdxError, StateMissing
from daemon.fs import fs_path, stored_path
from daemon.hub.client import HubClient, Limits
from daemon.inbox.mounts import stale_size_warnings_for
from daemon.installation import VERSION, foreign_package
from daemon.jobs.database import Database
from daemon.jobs.model import Instance, Job, Status, Waiting
from daemon.jobs.store import Store
from daemon.jobs.tables import make_engine
from daemon.jobs.views import Views
from daemon.logs import configure, printable, redact_url, scrub
from daemon.ops import explain, usage
from daemon.ops.health import EXIT_UNHEALTHY, verdict
from daemon.ops.healthsock import ask
from daemon.ops.report import (
    HubCheck,
    StatusReport,
    current_failures,
    filter_jobs,
    holder,
    instance_alive,
    instance_lines,
    instances_json,
    parse_duration,
    pid_runs,
    purge_plan,
    render_status,
)
from daemon.pipeline.budget import PageLimits, Used, decide, reached
from daemon.pipeline.delivery import held_path

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # as a shell reports a command ended by SIGPIPE (``jobs | head``)
FAILURES_LOOKED_AT = 500  # failed jobs ``status`` reads to find the current ones
HUB_CHECK_TIMEOUT = 5.0  # seconds ``status`` waits for the hub
PURGE_BATCH = 500  # jobs deleted per transaction
Command = Callable[[argparse.Namespace], int]
Options = Callable[[argparse.ArgumentParser], None]


def iso(ts: float | None) -> str | None:
    """An epoch time as ISO-8601 UTC, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def job_json(job: Job, now: float | None = None) -> dict[str, Any]:
    """The ``jobs --json`` shape of one job (``instance``: the one holding it now, or
    that last held it; ``held``: whether its lease is current)."""
    error = None
    if job.status is Status.FAILED or job.error_code:
        error = {"code": job.error_code, "message": job.error_message}
    return {
        "id": job.id,
        "path": job.path,
        "status": job.status.value,
        "stage": job.stage.value,
        "output": job.output if job.status is Status.COMPLETED else None,
        "error": error,
        "remote_job_id": job.remote_job_id,
        "remote_file_id": job.remote_file_id,
        "input_format": job.input_format,
        "output_format": job.output_format,
        "engine": job.engine,
        "language": job.language,
        "on_success": job.on_success,
        "rule": job.rule,
        "hook_error": job.hook_error,
        "attempts": job.attempts,
        "instance": job.owner,
        "held": holder(job, _now() if now is None else now) is not None,
        "lease_until": iso(job.lease_until),
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "finished_at": iso(job.finished_at),
        "next_attempt_at": iso(job.next_attempt_at),
    }


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(config_path(args.config))


def _store(settings: Settings, *, read_only: bool = False) -> Store:
    return Store(settings.database_url, read_only=read_only)


def _views(settings: Settings) -> tuple[Views, str | None]:
    """The operator's reads, and why there is no database to read yet (None: there is).

    They never create one: with none yet they read an empty one in memory, and the
    command says so (a mistyped state_db no longer shows as an empty queue)."""
    try:
        return Views(Database(settings.database_url, read_only=True)), None
    except StateMissing as exc:
        return Views(Database("sqlite://")), exc.message


def _shown(text: str) -> str:
    """Text for a terminal, line by line: no escapes or control characters in any line
    (a job's reason came from the hub)."""
    return "\n".join(printable(line) for line in text.split("\n"))


# -- subcommands ---------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon, in the foreground."""
    from daemon.errors import Unhealthy
    from daemon.service import run_service

    settings = _settings(args)
    configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(run_service(settings, once=False, reload_settings=lambda: _settings(args)))
    except Unhealthy:
        return EXIT_UNHEALTHY  # already logged; systemd or Docker restart us
    return EXIT_OK


def cmd_once(args: argparse.Namespace) -> int:
    """Process what is in the inbox now and exit."""
    from daemon.service import run_service

    settings = _settings(args)
    configure(settings.log_level, settings.log_format)
    progress = sys.stderr.isatty()  # a bar for a person watching, nothing in pipes and logs
    outcome = asyncio.run(
        run_service(settings, once=True, progress=progress, max_wait=args.max_wait)
    )
    assert outcome is not None
    print(
        f"{len(outcome.completed)} completed, {len(outcome.failed)} failed, "
        f"{len(outcome.unfinished)} unfinished"
    )
    for path in outcome.failed:
        print(f"failed: {path}")
    if outcome.auth_rejected:
        print(f"error: {outcome.auth_rejected}", file=sys.stderr)
    elif outcome.held and outcome.unfinished:
        print(
            f"unfinished after --max-wait: {outcome.held}; the unfinished files stay queued "
            "and are converted by the next run",
            file=sys.stderr,
        )
    return outcome.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    """Counts per status, the oldest waiting job, recent failures, daemon and hub health."""
    settings = _settings(args)
    views, missing = _views(settings)  # before the first run: the daemon and the hub
    inbox = settings.inbox.absolute()
    try:
        counts = views.counts()
        oldest = views.oldest_unfinished()
        failures = current_failures(
            views.jobs(Status.FAILED, limit=FAILURES_LOOKED_AT),
            lambda job: _still_current(views, inbox, job),
            args.failures,
        )
        hook_failures = views.hook_failures(limit=args.failures)
        stalled = views.waiting()
        instances = views.instances()
        held = views.held(_now())
        pages = _page_use(settings, views, _now())
    finally:
        views.database.close()
    hub = HubCheck(None, None, "skipped (--no-hub)") if args.no_hub else _hub_check(settings)
    report = StatusReport(
        now=_now(),
        counts=counts,
        oldest_waiting_at=oldest,
        failures=failures,
        heartbeat=ask(settings.health_socket_path),
        stall_timeout=settings.stall_timeout,
        hub_url=redact_url(settings.hub.base_url),
        hub=hub,
        hook_failures=hook_failures,
        pages=pages,
    )
    _show_status(
        report,
        missing,
        stalled,
        as_json=args.json,
        instances=instances,
        held=held,
        lease=settings.lease_seconds,
    )
    return EXIT_OK


def _show_status(
    report: StatusReport,
    missing: str | None,
    stalled: list[Waiting],
    *,
    as_json: bool,
    instances: list[Instance],
    held: dict[str, int],
    lease: float,
) -> None:
    """Print ``status``: the report, a missing database, the stalled inputs and the
    instances with the work each holds (alive by pid here, by ``lease`` elsewhere)."""
    here = socket.gethostname()

    def alive(item: Instance) -> bool:
        return instance_alive(item, report.now, lease, here, pid_runs)

    if as_json:
        payload = report.to_json(job_json)
        payload["stalled"] = [explain.waiting_json(item) for item in stalled]
        payload["instances"] = instances_json(instances, held, report.now, alive)
        payload["state_db_missing"] = missing
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    print(_shown(render_status(report)))
    if missing:
        print(f"state    {missing}")
    for line in explain.stalled_lines(stalled, report.now):
        print(_shown(line))
    for line in instance_lines(instances, held, report.now, alive):
        print(line)


def _page_use(settings: Settings, views: Views, now: float) -> usage.PageUse:
    """Pages billed today and this month, and the budget's sentence when it holds."""
    (day_start, _), (month_start, month_end) = usage.day_bounds(now), usage.month_bounds(now)
    found = views.pages_used(day_start, month_start, month_end)
    at_hub = sum(found.at_hub.values())
    limits = PageLimits(settings.budget.pages_per_day, settings.budget.pages_per_month)
    used = Used(found.today + at_hub, found.month + at_hub)
    hold = decide(used, 1, limits, now) if reached(used, limits) else None
    return usage.PageUse(
        found.today,
        found.month,
        limits.per_day,
        limits.per_month,
        hold.sentence() if hold is not None else None,
    )


def cmd_usage(args: argparse.Namespace) -> int:
    """Files and pages the hub billed in a period, per folder, rule, day or month."""
    settings = _settings(args)
    try:
        period = usage.parse_period(_now(), args.month, args.since, args.until)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    views, missing = _views(settings)
    if missing is not None:
        print(f"note: {missing} (check state_db; nothing was created)", file=sys.stderr)
    try:
        billed = views.billed(period.start, period.end)
    finally:
        views.database.close()
    report = usage.summarize(billed, period, args.by, args.depth)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    elif args.csv:
        sys.stdout.write(usage.to_csv(report))
    else:
        print(usage.render(report))
    return EXIT_OK


def _still_current(views: Views, inbox: Path, job: Job) -> bool:
    """Whether a failure still stands: its input is in the inbox and no later job of the
    same path (a corrected file) replaced it."""
    if not os.path.lexists(inbox / fs_path(job.path)):
        return False
    latest = views.latest_for_path(job.path)
    return latest is not None and latest.id == job.id


def cmd_explain(args: argparse.Namespace) -> int:
    """Why a file is or is not being processed."""
    settings = _settings(args)
    store = _store(settings, read_only=True)
    try:
        found = [
            explain.explain_path(settings, store, path, Path.cwd(), _now()) for path in args.paths
        ]
    finally:
        store.close()
    if args.json:
        print(json.dumps([e.to_json() for e in found], indent=2, ensure_ascii=False))
        return EXIT_OK
    for item in found:
        print(_shown(f"{item.path} [{item.state}]"))
        for line in item.lines:
            print(f"  {_shown(line)}")
    return EXIT_OK


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _hub_check(settings: Settings) -> HubCheck:
    try:
        key = resolve_api_key(settings.hub)
    except ConfigError as exc:
        return HubCheck(None, None, exc.message)
    return asyncio.run(_call_hub(settings.hub.base_url, key))


async def _call_hub(base_url: str, key: str) -> HubCheck:
    timeout = HUB_CHECK_TIMEOUT
    limits = Limits(deadline=timeout)
    async with HubClient.connect(base_url, key, timeout=timeout, limits=limits) as client:
        try:
            await client.list_files()
        except AuthRejected as exc:
            return HubCheck(True, False, scrub(exc.message))
        except LdxError as exc:
            return HubCheck(False, None, scrub(exc.message))
    return HubCheck(True, True, "GET /files answered")


def cmd_jobs(args: argparse.Namespace) -> int:
    """One line per job, filtered by status, path and age."""
    status = Status(args.status) if args.status else None
    now = _now()
    views, missing = _views(_settings(args))
    if missing is not None:
        print(f"note: {missing} (check state_db; nothing was created)", file=sys.stderr)
    try:
        found = views.find(
            status,
            created_before=now - args.older_than if args.older_than is not None else None,
            created_after=now - args.newer_than if args.newer_than is not None else None,
        )
    finally:
        views.database.close()
    jobs = filter_jobs(found, args.path, args.limit)
    if args.json:
        print(json.dumps([job_json(j, now) for j in jobs], indent=2, ensure_ascii=False))
        return EXIT_OK
    for job in jobs:
        detail = job.output if job.status is Status.COMPLETED else (job.error_message or "")
        held_by = holder(job, now)
        where = f"  [held by {held_by}]" if held_by is not None else ""
        print(_shown(f"#{job.id:<6} {job.status.value:<10} {job.path}  {detail}{where}"))
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    """``db upgrade``: bring the state database's schema to this version's; ``db
    version``: show it."""
    from daemon.jobs import schema

    settings = _settings(args)
    if args.action == "version":
        store = _store(settings, read_only=True)
        try:
            print(
                f"schema version {schema.current(store.engine)} (this ldx-hotfolder: {schema.HEAD})"
            )
        finally:
            store.close()
        return EXIT_OK
    engine = make_engine(settings.database_url)
    try:
        before, after = schema.upgrade(engine)
    finally:
        engine.dispose()
    if before == after:
        print(f"the state database is up to date (schema version {after})")
    else:
        print(f"upgraded the state database from schema version {before} to {after}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Put failed jobs back in the queue; say why a named job was not."""
    if not args.failed and not args.targets:
        print("error: name jobs or paths to retry, or use --failed", file=sys.stderr)
        return EXIT_CONFIG
    settings = _settings(args)
    store = _store(settings)
    try:
        ids, unknown = _resolve_targets(store, settings, args)
        held = settings.held_dir.absolute()
        requeued = store.requeue(
            ids,
            datetime.now(UTC).timestamp(),
            output_kept=lambda job: held_path(held, job).exists(),
        )
        taken = {job.id for job in requeued}
        refused = [job for i in ids if i not in taken and (job := store.get(i)) is not None]
    finally:
        store.close()
    for target in unknown:
        print(f"not found: {target}", file=sys.stderr)
    for job in refused:
        print(f"not retried: #{job.id} {job.path}: {_not_retried(job)}", file=sys.stderr)
    code = EXIT_FAILED if unknown or refused else EXIT_OK
    if args.json:
        payload = {
            "requeued": [job_json(job) for job in requeued],
            "not_found": unknown,
            "not_retried": [
                {
                    "id": job.id,
                    "path": job.path,
                    "status": job.status.value,
                    "why": _not_retried(job),
                }
                for job in refused
            ],
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return code
    print(f"requeued {len(requeued)} job(s)")
    for job in requeued:
        print(f"  #{job.id} {job.path}")
    return code


def _not_retried(job: Job) -> str:
    """Why ``retry`` leaves a job that did not fail alone."""
    if job.status is Status.COMPLETED:
        return (
            "it completed, so there is nothing to retry (to convert it again, drop the "
            "file in the inbox again under a new name or with changed content)"
        )
    return f"it is {job.status.value} already; the daemon works on it"


def _resolve_targets(
    store: Store, settings: Settings, args: argparse.Namespace
) -> tuple[list[int], list[str]]:
    if args.failed:
        return [job.id for job in Views(store).jobs(Status.FAILED)], []
    ids: list[int] = []
    unknown: list[str] = []
    for target in args.targets:
        job = _find_job(store, settings, target)
        if job is None:
            unknown.append(target)
        else:
            ids.append(job.id)
    return ids, unknown


def _find_job(store: Store, settings: Settings, target: str) -> Job | None:
    if target.lstrip("#").isdigit():
        return store.get(int(target.lstrip("#")))
    path = Path(target)
    if path.is_absolute():
        try:
            target = path.relative_to(settings.inbox.absolute()).as_posix()
        except ValueError:
            return None
    # A name with odd bytes is stored percent-escaped (daemon.fs); accept both forms.
    rel = target.strip("/")
    views = Views(store)
    return views.latest_for_path(stored_path(rel)) or views.latest_for_path(rel)


def cmd_purge(args: argparse.Namespace) -> int:
    """Delete old completed (and/or failed) jobs from the table."""
    wanted = {Status.COMPLETED: args.completed, Status.FAILED: args.failed}
    statuses = [status for status, chosen in wanted.items() if chosen]
    if not statuses:
        print("error: say what to purge: --completed and/or --failed", file=sys.stderr)
        return EXIT_CONFIG
    settings = _settings(args)
    inbox = settings.inbox.absolute()
    store = _store(settings)
    try:
        candidates = Views(store).purge_candidates(statuses, _now() - args.older_than)
        delete, kept = purge_plan(candidates, lambda path: os.path.lexists(inbox / path))
        deleted = 0 if args.dry_run else _delete_in_batches(store, delete)
    finally:
        store.close()
    result = {"purged": deleted, "planned": len(delete), "kept": len(kept), "dry_run": args.dry_run}
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    verb = "would purge" if args.dry_run else "purged"
    print(f"{verb} {len(delete)} job(s); kept {len(kept)} still remembering an input in the inbox")
    return EXIT_OK


def _delete_in_batches(store: Store, ids: list[int]) -> int:
    return sum(store.delete(ids[i : i + PURGE_BATCH]) for i in range(0, len(ids), PURGE_BATCH))


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon is alive, watching and able to work (a hub outage counts
    as able: it passes by itself), 1 otherwise, saying why (``ops.health.verdict``)."""
    settings = _settings(args)
    path = settings.health_socket_path
    beat = ask(path)
    ok, notes = verdict(beat, _now(), settings.stall_timeout)
    if args.json:
        payload = {
            "healthy": ok,
            "notes": notes,
            "socket": str(path),
            "held": (beat.paused or beat.outage) if beat else None,
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        for note in notes:
            print(_shown(note if ok else f"unhealthy: {note}"))
    return EXIT_OK if ok else EXIT_FAILED


def cmd_engines(args: argparse.Namespace) -> int:
    """The engines, languages and conversions the hub offers."""
    settings = None if args.base_url and args.config is None else _settings(args)
    base_url = args.base_url or (settings.hub.base_url if settings else "")
    engines = asyncio.run(_fetch_engines(base_url, _key_if_any(settings)))
    if engines is None:
        print("error: the hub's engine list cannot be read", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps([e.model_dump(by_alias=True) for e in engines], indent=2))
        return EXIT_OK
    for engine in engines:
        print(f"{engine.id}  {engine.display_name or ''}")
        listed = engine.supported_languages
        langs = ", ".join(lang.code for lang in listed) if listed else "(not listed)"
        print(f"  languages: {langs}")
        convs = engine.supported_conversions
        pairs = sorted({f"{c.from_}->{c.to}" for c in convs}) if convs else ["(not listed)"]
        print(f"  conversions: {', '.join(pairs)}")
    return EXIT_OK


def _key_if_any(settings: Settings | None) -> str:
    """The configured key, for a gateway that wants it on the engine list too ("" if none)."""
    if settings is None:
        return ""
    try:
        return resolve_api_key(settings.hub)
    except ConfigError:
        return ""


async def _fetch_engines(base_url: str, key: str) -> list[Any] | None:
    async with HubClient.connect(base_url, api_key=key) as client:
        return await client.engines()


def cmd_check(args: argparse.Namespace) -> int:
    """Validate configuration, folders, the API key and the engine, language and format
    of ``[hub]`` and every rule against the hub's list; say what is wrong. A value the
    hub does not offer ends it as ``run`` ends: the same message, exit 2."""
    settings = _settings(args)
    print(f"configuration: ok ({config_path(args.config)})")
    problems = check_folders(settings)
    for problem in problems:
        print(f"folders: {problem}")
    if not problems:
        print(f"folders: ok (inbox {settings.inbox}, outbox {settings.outbox})")
    for warning in stale_size_warnings_for(settings.inbox, settings.quiet_period):
        print(f"folders: warning: {warning}")
    key_ok = asyncio.run(_check_key(settings))
    print(f"hub offer: {asyncio.run(_check_offer(settings))}")
    return EXIT_OK if key_ok and not problems else EXIT_CONFIG


async def _check_offer(settings: Settings) -> str:
    """What ``run`` finds when it checks the settings against the hub's engine list
    (``service.hub_offer``); ConfigError when the hub does not offer them."""
    from daemon.service import hub_offer, route_defaults

    hub = settings.hub
    async with HubClient.connect(
        hub.base_url, _key_if_any(settings), timeout=hub.timeout
    ) as client:
        offer, warning = await hub_offer(client, settings.rules, route_defaults(settings))
    if warning is not None:
        return f"warning: {warning}"
    assert offer is not None
    rules = f" and {len(settings.rules)} rule(s)" if settings.rules else ""
    return f"ok (engine, language and format of [hub]{rules} offered by {hub.base_url})"


async def _check_key(settings: Settings) -> bool:
    try:
        key = resolve_api_key(settings.hub)
    except ConfigError as exc:
        print(f"api key: {exc.message}")
        return False
    hub = settings.hub
    async with HubClient.connect(hub.base_url, key, timeout=hub.timeout) as client:
        try:
            await client.list_files()
        except AuthRejected as exc:
            print(f"api key: rejected by {redact_url(settings.hub.base_url)} ({exc.message})")
            return False
        except LdxError as exc:
            print(f"api key: cannot check, the hub is unreachable: {exc.message}")
            return False
    print(f"api key: accepted by {redact_url(settings.hub.base_url)}")
    return True


def cmd_emulator(args: argparse.Namespace) -> int:
    """Serve the LDX hub emulator."""
    from daemon.emulator import cli as emulator_cli

    configure("info", "auto")
    _note_config_unused(args, "the emulator takes its settings from its own options")
    return emulator_cli.run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Emulator and daemon on sample scans in a temporary folder."""
    from daemon import demo

    _note_config_unused(args, "the demo runs on its own folders, emulator and settings")
    return demo.run(keep=args.keep)


def _note_config_unused(args: argparse.Namespace, why: str) -> None:
    # Every subcommand takes -c (the contract); say so rather than ignore it silently.
    if args.config is not None:
        print(f"note: {args.command} does not read {args.config}: {why}", file=sys.stderr)


# -- parser ---------------------------------------------------------------------------


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand; given the ``command`` to be run, the
    emulator's options are added only when it is that one."""
    parser = argparse.ArgumentParser(
        prog="ldx-hotfolder",
        description="Watched-folder OCR daemon: converts scans dropped into an inbox "
        "into docx, xlsx or pptx with the LDX hub RenderOCR API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help="configuration file (default: $LDX_HOTFOLDER_CONFIG, else "
        "/etc/ldx-hotfolder/config.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func, help_text, options in _commands():
        subparser = _add(sub, common, name, func, help_text)
        # The emulator's options come with its web stack (uvicorn, starlette): about 4 MB
        # that a running daemon would keep for nothing.
        if options is not None and (name != "emulator" or command in (None, name)):
            options(subparser)
    return parser


def _emulator_options(parser: argparse.ArgumentParser) -> None:
    from daemon.emulator import cli as emulator_cli

    emulator_cli.configure_parser(parser)


def _command_in(argv: Sequence[str] | None) -> str | None:
    """The subcommand named on the command line: its first word (the top level takes
    no option with a value)."""
    words = sys.argv[1:] if argv is None else argv
    return next((word for word in words if not word.startswith("-")), None)


def _commands() -> list[tuple[str, Command, str, Options | None]]:
    """Every subcommand: name, function, help, and what adds its own options."""
    return [
        ("run", cmd_run, "run the daemon in the foreground", None),
        (
            "once",
            cmd_once,
            "process what is in the inbox now, then exit "
            "(0: all completed, 1: some failed, 2: configuration error, "
            "3: work still held when --max-wait ran out)",
            _once_options,
        ),
        ("status", cmd_status, "counts per status and recent failures", _status_options),
        ("jobs", cmd_jobs, "one line per job, newest first", _jobs_options),
        (
            "usage",
            cmd_usage,
            "files and pages the hub billed, per folder, rule, day or month "
            "(default: this month, by folder)",
            _usage_options,
        ),
        ("retry", cmd_retry, "put failed jobs back in the queue", _retry_options),
        (
            "purge",
            cmd_purge,
            "delete old final jobs from the state table (never a kept input's newest job)",
            _purge_options,
        ),
        (
            "health",
            cmd_health,
            "exit 0 when the running daemon is alive and watching, 1 when it is stuck, blind, "
            "not running, or holds work until a person acts (for scripts and Docker's "
            "HEALTHCHECK)",
            _json_flag,
        ),
        (
            "engines",
            cmd_engines,
            "the engines, languages and conversions the hub offers",
            _engines_options,
        ),
        ("explain", cmd_explain, "why a file is or is not being processed", _explain_options),
        (
            "db",
            cmd_db,
            "the state database's schema: upgrade it to this version's, or show its version",
            _db_options,
        ),
        (
            "check",
            cmd_check,
            "validate configuration, folders and the API key, and say what is wrong",
            None,
        ),
        ("emulator", cmd_emulator, "serve the LDX hub emulator", _emulator_options),
        (
            "demo",
            cmd_demo,
            "run emulator and daemon on sample scans and show the result",
            _demo_options,
        ),
    ]


def _once_options(once: argparse.ArgumentParser) -> None:
    once.add_argument(
        "--max-wait",
        type=_duration,
        default=3600.0,
        metavar="AGE",
        help="how long to wait while work is held (hub unreachable, page budget reached) "
        "before exiting with status 3, the held files still queued (default 1h)",
    )


def _json_flag(command: argparse.ArgumentParser, help_text: str = "print JSON") -> None:
    command.add_argument("--json", action="store_true", help=help_text)


def _engines_options(engines: argparse.ArgumentParser) -> None:
    engines.add_argument("--base-url", help="ask this hub instead of the configured one")
    _json_flag(engines)


def _explain_options(explained: argparse.ArgumentParser) -> None:
    explained.add_argument(
        "paths", nargs="+", metavar="PATH", help="a file or folder (in the inbox or relative to it)"
    )
    _json_flag(explained, "print a JSON array")


def _db_options(db: argparse.ArgumentParser) -> None:
    db.add_argument(
        "action",
        choices=["upgrade", "version"],
        help="upgrade: bring the schema up to this version's (one transaction); "
        "version: print the database's schema version and the program's",
    )


def _demo_options(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--keep", metavar="DIR", help="leave the demo folders in DIR")


def _status_options(status: argparse.ArgumentParser) -> None:
    _json_flag(status)
    status.add_argument("--failures", type=int, default=5, help="failures to list (default 5)")
    status.add_argument(
        "--no-hub", action="store_true", help="do not call the hub to check reachability and key"
    )


def _jobs_options(jobs: argparse.ArgumentParser) -> None:
    jobs.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    jobs.add_argument(
        "--path",
        metavar="PATTERN",
        help="only inputs matching this glob (invoices/*.pdf) or under this folder (invoices)",
    )
    jobs.add_argument(
        "--older-than", type=_duration, metavar="AGE", help="only jobs queued over AGE ago (2h, 7d)"
    )
    jobs.add_argument(
        "--newer-than", type=_duration, metavar="AGE", help="only jobs queued within AGE (30m)"
    )
    jobs.add_argument("--limit", type=int, default=None, help="at most this many jobs")
    _json_flag(jobs, "print a JSON array")


def _usage_options(command: argparse.ArgumentParser) -> None:
    when = command.add_mutually_exclusive_group()
    when.add_argument("--month", metavar="YYYY-MM", help="this calendar month (UTC)")
    when.add_argument("--since", metavar="DATE", help="from this date or time (UTC unless it says)")
    command.add_argument(
        "--until", metavar="DATE", help="up to this date (included) or time; default now"
    )
    command.add_argument(
        "--by", choices=usage.GROUPINGS, default="folder", help="one row per ... (default folder)"
    )
    command.add_argument(
        "--depth",
        type=_positive,
        default=1,
        metavar="N",
        help="folders N levels below the inbox (default 1)",
    )
    shape = command.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print one JSON object")
    shape.add_argument("--csv", action="store_true", help="print CSV: key, files, pages")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of 1 or more: {text!r}")
    return value


def _retry_options(retry: argparse.ArgumentParser) -> None:
    # Either named jobs or every failed one, as the usage line says; never both at once.
    retry.usage = "%(prog)s [-h] [-c PATH] [--json] (JOB_OR_PATH ... | --failed)"
    which = retry.add_mutually_exclusive_group()
    which.add_argument(
        "targets",
        nargs="*",
        default=[],
        metavar="JOB_OR_PATH",
        help="job id or input path (relative to the inbox)",
    )
    which.add_argument("--failed", action="store_true", help="every failed job")
    _json_flag(retry, "print the requeued jobs as JSON")


def _purge_options(purge: argparse.ArgumentParser) -> None:
    purge.add_argument("--completed", action="store_true", help="purge completed jobs")
    purge.add_argument("--failed", action="store_true", help="purge failed jobs")
    purge.add_argument(
        "--older-than",
        type=_duration,
        required=True,
        metavar="AGE",
        help="only jobs that finished more than AGE ago (30d, 12h)",
    )
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    _json_flag(purge)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add(
    sub: Any, common: argparse.ArgumentParser, name: str, func: Command, help_text: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, parents=[common], help=help_text, description=help_text
    )
    parser.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    foreign = foreign_package()
    if foreign is not None:
        print(f"ldx-hotfolder: {foreign}", file=sys.stderr)
        return EXIT_CONFIG
    args = build_parser(_command_in(argv)).parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a reader that went away (``| head``) shows here, not at exit
    except ConfigError as exc:
        kind = "" if isinstance(exc, AlreadyRunning) else "configuration error: "
        print(f"ldx-hotfolder: {kind}{exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    return code


def _quiet_stdout() -> None:
    """Send what is left for stdout nowhere: the reader is gone (``jobs | head``), and
    Python would otherwise complain when it flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
