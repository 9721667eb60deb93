"""Command line: ``ldx-hotfolder`` and its subcommands.

Each subcommand is one small function taking the parsed arguments and returning an exit
code. Configuration errors print one message naming the problem and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.client import HubClient
from daemon.config import Settings, check_folders, config_path, load_settings, resolve_api_key
from daemon.errors import AuthRejected, ConfigError, LdxError
from daemon.logs import configure
from daemon.store import Job, Status, Store

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
Command = Callable[[argparse.Namespace], int]


def iso(ts: float | None) -> str | None:
    """An epoch time as ISO-8601 UTC, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def job_json(job: Job) -> dict[str, Any]:
    """The ``jobs --json`` shape of one job."""
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
        "attempts": job.attempts,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "finished_at": iso(job.finished_at),
        "next_attempt_at": iso(job.next_attempt_at),
    }


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(config_path(args.config))


def _store(settings: Settings) -> Store:
    return Store(settings.database_url)


# -- subcommands ---------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon, in the foreground."""
    from daemon.service import run_service

    settings = _settings(args)
    configure(settings.log_level, settings.log_format)
    asyncio.run(run_service(settings, once=False))
    return EXIT_OK


def cmd_once(args: argparse.Namespace) -> int:
    """Process what is in the inbox now and exit."""
    from daemon.service import run_service

    settings = _settings(args)
    configure(settings.log_level, settings.log_format)
    outcome = asyncio.run(run_service(settings, once=True))
    assert outcome is not None
    print(
        f"{len(outcome.completed)} completed, {len(outcome.failed)} failed, "
        f"{len(outcome.unfinished)} unfinished"
    )
    for path in outcome.failed:
        print(f"failed: {path}")
    if outcome.auth_rejected:
        print(f"error: {outcome.auth_rejected}", file=sys.stderr)
    return outcome.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    """Counts per status and the most recent failures."""
    store = _store(_settings(args))
    try:
        counts = store.counts()
        failures = store.jobs(Status.FAILED, limit=args.failures)
    finally:
        store.close()
    if args.json:
        payload = {"counts": counts, "recent_failures": [job_json(j) for j in failures]}
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return EXIT_OK
    print("  ".join(f"{name}: {counts[name]}" for name in counts))
    if failures:
        print("\nrecent failures:")
        for job in failures:
            print(f"  #{job.id} {job.path}: {job.error_message} [{job.error_code}]")
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    """One line per job."""
    status = Status(args.status) if args.status else None
    store = _store(_settings(args))
    try:
        jobs = store.jobs(status, limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps([job_json(j) for j in jobs], indent=2, ensure_ascii=False))
        return EXIT_OK
    for job in jobs:
        detail = job.output if job.status is Status.COMPLETED else (job.error_message or "")
        print(f"#{job.id:<6} {job.status.value:<10} {job.path}  {detail}")
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
        requeued = store.requeue(ids, datetime.now(UTC).timestamp())
    finally:
        store.close()
    for target in unknown:
        print(f"not found: {target}", file=sys.stderr)
    print(f"requeued {len(requeued)} job(s)")
    for job in requeued:
        print(f"  #{job.id} {job.path}")
    return EXIT_FAILED if unknown else EXIT_OK


def _resolve_targets(
    store: Store, settings: Settings, args: argparse.Namespace
) -> tuple[list[int], list[str]]:
    if args.failed:
        return [job.id for job in store.jobs(Status.FAILED)], []
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
    return store.latest_for_path(target.strip("/"))


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
    async with HubClient(base_url, api_key="") as client:
        return await client.engines()


def cmd_check(args: argparse.Namespace) -> int:
    """Validate configuration, folders and the API key; say what is wrong."""
    settings = _settings(args)
    print(f"configuration: ok ({config_path(args.config)})")
    problems = check_folders(settings)
    for problem in problems:
        print(f"folders: {problem}")
    if not problems:
        print(f"folders: ok (inbox {settings.inbox}, outbox {settings.outbox})")
    key_ok = asyncio.run(_check_key(settings))
    return EXIT_OK if key_ok and not problems else EXIT_CONFIG


async def _check_key(settings: Settings) -> bool:
    try:
        key = resolve_api_key(settings.hub)
    except ConfigError as exc:
        print(f"api key: {exc.message}")
        return False
    async with HubClient(settings.hub.base_url, key, timeout=settings.hub.timeout) as client:
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
    return emulator_cli.run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Emulator and daemon on sample scans in a temporary folder."""
    from daemon import demo

    return demo.run(keep=args.keep)


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
    _add(sub, common, "run", cmd_run, "run the daemon in the foreground")
    _add(
        sub,
        common,
        "once",
        cmd_once,
        "process what is in the inbox now, then exit "
        "(0: all completed, 1: some failed, 2: configuration error)",
    )
    status = _add(sub, common, "status", cmd_status, "counts per status and recent failures")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--failures", type=int, default=5, help="failures to list (default 5)")
    jobs = _add(sub, common, "jobs", cmd_jobs, "one line per job, newest first")
    jobs.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    jobs.add_argument("--limit", type=int, default=None, help="at most this many jobs")
    jobs.add_argument("--json", action="store_true", help="print a JSON array")
    retry = _add(sub, common, "retry", cmd_retry, "put failed jobs back in the queue")
    retry.add_argument(
        "targets",
        nargs="*",
        metavar="JOB_OR_PATH",
        help="job id or input path (relative to the inbox)",
    )
    retry.add_argument("--failed", action="store_true", help="every failed job")
    engines = _add(
        sub, common, "engines", cmd_engines, "the engines, languages and conversions the hub offers"
    )
    engines.add_argument("--base-url", help="ask this hub instead of the configured one")
    engines.add_argument("--json", action="store_true", help="print JSON")
    _add(
        sub,
        common,
        "check",
        cmd_check,
        "validate configuration, folders and the API key, and say what is wrong",
    )
    emulator = _add(sub, common, "emulator", cmd_emulator, "serve the LDX hub emulator")
    from daemon.emulator import cli as emulator_cli

    emulator_cli.configure_parser(emulator)
    demo = _add(
        sub, common, "demo", cmd_demo, "run emulator and daemon on sample scans and show the result"
    )
    demo.add_argument("--keep", metavar="DIR", help="leave the demo folders in DIR")
    return parser


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
