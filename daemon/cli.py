"""Command line: ``ldx-hotfolder`` and its subcommands.

Each subcommand is one small function taking the parsed arguments and returning an exit
code. Configuration errors print one message naming the problem and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.config import Settings, check_folders, config_path, load_settings, resolve_api_key
from daemon.errors import AuthRejected, ConfigError, LdxError
from daemon.fs import stored_path
from daemon.hub.client import HubClient, Limits
from daemon.inbox.mounts import stale_size_warnings_for
from daemon.jobs.database import Database
from daemon.jobs.model import Job, Status
from daemon.jobs.store import Store
from daemon.jobs.tables import make_engine
from daemon.jobs.views import Views
from daemon.logs import configure, scrub
from daemon.ops import explain, usage
from daemon.ops.health import EXIT_UNHEALTHY, read_heartbeat, verdict
from daemon.ops.report import (
    HubCheck,
    StatusReport,
    filter_jobs,
    holder,
    instance_lines,
    instances_json,
    parse_duration,
    purge_plan,
    render_status,
)
from daemon.pipeline.budget import PageLimits, Used, decide, reached
from daemon.pipeline.steps import held_path

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
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


def _store(settings: Settings) -> Store:
    return Store(settings.database_url)


def _views(settings: Settings) -> Views:
    return Views(Database(settings.database_url))


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
    views = _views(settings)
    try:
        counts = views.counts()
        oldest = views.oldest_unfinished()
        failures = views.jobs(Status.FAILED, limit=args.failures)
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
        heartbeat=read_heartbeat(settings.heartbeat_path),
        stall_timeout=settings.stall_timeout,
        hub_url=settings.hub.base_url,
        hub=hub,
        hook_failures=hook_failures,
        pages=pages,
    )
    if args.json:
        payload = report.to_json(job_json)
        payload["stalled"] = [explain.waiting_json(item) for item in stalled]
        lease = settings.lease_seconds
        payload["instances"] = instances_json(instances, held, report.now, lease)
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(render_status(report))
        for line in explain.stalled_lines(stalled, report.now):
            print(line)
        for line in instance_lines(instances, held, report.now, settings.lease_seconds):
            print(line)
    return EXIT_OK


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
    views = _views(settings)
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


def cmd_explain(args: argparse.Namespace) -> int:
    """Why a file is or is not being processed."""
    settings = _settings(args)
    store = _store(settings)
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
        print(f"{item.path} [{item.state}]")
        for line in item.lines:
            print(f"  {line}")
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
    views = _views(_settings(args))
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
        print(f"#{job.id:<6} {job.status.value:<10} {job.path}  {detail}{where}")
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    """``db upgrade``: bring the state database's schema to this version's; ``db
    version``: show it."""
    from daemon.jobs import schema

    settings = _settings(args)
    if args.action == "version":
        store = _store(settings)
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
    """Put failed jobs back in the queue."""
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
    finally:
        store.close()
    for target in unknown:
        print(f"not found: {target}", file=sys.stderr)
    if args.json:
        payload = {"requeued": [job_json(job) for job in requeued], "not_found": unknown}
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return EXIT_FAILED if unknown else EXIT_OK
    print(f"requeued {len(requeued)} job(s)")
    for job in requeued:
        print(f"  #{job.id} {job.path}")
    return EXIT_FAILED if unknown else EXIT_OK


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
    """Exit 0 when the daemon is alive and watching, 1 otherwise, saying why."""
    settings = _settings(args)
    beat = read_heartbeat(settings.heartbeat_path)
    ok, notes = verdict(beat, _now(), settings.stall_timeout)
    if args.json:
        payload = {"healthy": ok, "notes": notes, "heartbeat": str(settings.heartbeat_path)}
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        for note in notes:
            print(note if ok else f"unhealthy: {note}")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_engines(args: argparse.Namespace) -> int:
    """The engines, languages and conversions the hub offers."""
    base_url = args.base_url or _settings(args).hub.base_url
    engines = asyncio.run(_fetch_engines(base_url))
    if args.json:
        print(json.dumps([e.model_dump(by_alias=True) for e in engines], indent=2))
        return EXIT_OK
    for engine in engines:
        print(f"{engine.id}  {engine.display_name or ''}")
        langs = ", ".join(lang.code for lang in engine.supported_languages)
        print(f"  languages: {langs}")
        pairs = sorted({f"{c.from_}->{c.to}" for c in engine.supported_conversions})
        print(f"  conversions: {', '.join(pairs)}")
    return EXIT_OK


async def _fetch_engines(base_url: str) -> list[Any]:
    async with HubClient.connect(base_url, api_key="") as client:
        return await client.engines() or []


def cmd_check(args: argparse.Namespace) -> int:
    """Validate configuration, folders and the API key; say what is wrong."""
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
    return EXIT_OK if key_ok and not problems else EXIT_CONFIG


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
            print(f"api key: rejected by {settings.hub.base_url} ({exc.message})")
            return False
        except LdxError as exc:
            print(f"api key: cannot check, the hub is unreachable: {exc.message}")
            return False
    print(f"api key: accepted by {settings.hub.base_url}")
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ldx-hotfolder",
        description="Watched-folder OCR daemon: converts scans dropped into an inbox "
        "into docx, xlsx or pptx with the LDX hub RenderOCR API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
        command = _add(sub, common, name, func, help_text)
        if options is not None:
            options(command)
    return parser


def _commands() -> list[tuple[str, Command, str, Options | None]]:
    """Every subcommand: name, function, help, and what adds its own options."""
    from daemon.emulator import cli as emulator_cli

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
            "exit 0 when the running daemon is alive and watching, 1 when it is stuck, blind "
            "or not running (for scripts and Docker's HEALTHCHECK)",
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
        ("emulator", cmd_emulator, "serve the LDX hub emulator", emulator_cli.configure_parser),
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
    # Either named jobs or every failed one, as design.md writes it; never both at once.
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
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"ldx-hotfolder: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return code
