"""Demo: the emulator and the daemon on sample scans, for a newcomer without an API key.

Lays out a temporary inbox with the sample scans shipped in ``daemon/demo_scans``
(nested folders, one of them with a non-ASCII name, and one deliberately broken PDF),
serves the LDX hub emulator on a free loopback port, runs the daemon in ``once`` mode
against it, and shows what came out and why the broken file failed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from daemon.config import HubSettings, Settings
from daemon.emulator.hub import DEFAULT_API_KEY
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.jobs.database import Database
from daemon.jobs.model import Job, Status
from daemon.jobs.views import Views
from daemon.logs import configure
from daemon.outbox.layout import error_file_for
from daemon.service import Outcome, run_service

# Sample scan -> where the demo drops it in the inbox.
LAYOUT = {
    "skew.pdf": "invoices/2026/skew.pdf",
    "linn-g4.tif": "letters/linn-g4.tif",
    "baiona_color.jpg": "photos/baiona_color.jpg",
    "typewriter.png": "請求書 2026/typewriter.png",
    "typewriter-1bit.bmp": "letters/typewriter-1bit.bmp",
    "invalid.pdf": "broken/invalid.pdf",
}
BROKEN = "broken/invalid.pdf"


def lay_out_inbox(inbox: Path) -> list[str]:
    """Copy the sample scans into ``inbox``; return their relative paths."""
    scans = resources.files("daemon") / "demo_scans"
    for name, rel in LAYOUT.items():
        target = inbox / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with resources.as_file(scans / name) as source:
            shutil.copyfile(source, target)
    return sorted(LAYOUT.values())


def demo_settings(root: Path, base_url: str) -> Settings:
    """Settings for the demo folders and the emulator at ``base_url``."""
    return Settings(
        inbox=root / "inbox",
        outbox=root / "outbox",
        state_db=str(root / "state" / "state.db"),
        quiet_period=0.5,
        log_level="warning",
        hub=HubSettings(base_url=base_url, api_key=DEFAULT_API_KEY, language="eng"),
    )


def write_config(root: Path, settings: Settings) -> Path:
    """A config.toml for the demo folders, so the operator commands can be tried."""
    path = root / "config.toml"
    path.write_text(
        f'inbox = "{settings.inbox}"\n'
        f'outbox = "{settings.outbox}"\n'
        f'state_db = "{settings.state_db}"\n'
        f"\n[hub]\n"
        f'base_url = "{settings.hub.base_url}"\n'
        f'api_key = "{DEFAULT_API_KEY}"\n'
        f'language = "{settings.hub.language}"\n',
        encoding="utf-8",
    )
    return path


def job_table(settings: Settings) -> list[Job]:
    """The demo's jobs from the state table, by input path."""
    database = Database(settings.database_url)
    try:
        return sorted(Views(database).jobs(), key=lambda job: job.path)
    finally:
        database.close()


def report(root: Path, outcome: Outcome, ledger: dict[str, object], table: list[Job]) -> str:
    """What the demo shows at the end."""
    outbox = root / "outbox"
    lines = ["", "Job table (what `ldx-hotfolder jobs` shows):"]
    for job in table:
        done = job.status is Status.COMPLETED
        detail = f"-> {job.output}" if done else f"({job.error_code or job.stage.value})"
        lines.append(f"  #{job.id:<3} {job.status.value:<10} {job.path}  {detail}")
    lines += ["", "Outbox (mirrors the inbox):"]
    for path in sorted(p for p in outbox.rglob("*") if p.is_file()):
        lines.append(f"  {path.relative_to(outbox)}  ({path.stat().st_size:,} bytes)")
    lines.append("")
    lines.append(
        f"{len(outcome.completed)} converted, {len(outcome.failed)} failed, "
        f"{len(outcome.unfinished)} unfinished."
    )
    uploads = ledger.get("uploads", [])
    jobs = ledger.get("jobs", [])
    lines.append(
        f"The emulated hub received {len(uploads) if isinstance(uploads, list) else '?'} "
        f"uploads and {len(jobs) if isinstance(jobs, list) else '?'} conversion jobs."
    )
    error_file = outbox / error_file_for(BROKEN)
    if error_file.exists():
        lines.append("")
        lines.append(f"{BROKEN} is broken on purpose; its error file {error_file_for(BROKEN)}:")
        lines += [f"  | {line}" for line in error_file.read_text(encoding="utf-8").splitlines()]
    return "\n".join(lines)


def expected(outcome: Outcome) -> bool:
    """Whether every good scan converted and only the broken one failed."""
    return outcome.failed == [BROKEN] and not outcome.unfinished


def run(keep: str | None = None) -> int:
    """Run the demo; 0 when it showed what it should."""
    configure("warning", "console")
    if keep:
        root = Path(keep).absolute()
        root.mkdir(parents=True, exist_ok=True)
        return _run_in(root, keep=True)
    with tempfile.TemporaryDirectory(prefix="ldx-hotfolder-demo-") as tmp:
        return _run_in(Path(tmp), keep=False)


def _run_in(root: Path, *, keep: bool) -> int:
    for name in ("inbox", "outbox", "state"):
        (root / name).mkdir(exist_ok=True)
    inputs = lay_out_inbox(root / "inbox")
    print(f"Demo folder: {root}")
    print(f"Dropped {len(inputs)} sample scans into the inbox:")
    for rel in inputs:
        print(f"  {rel}")
    emulator_settings = EmulatorSettings(processing_time=(0.5, 1.5), seed=7)
    with EmulatorServer(emulator_settings) as emulator:
        print(f"\nLDX hub emulator on {emulator.url}; converting...")
        settings = demo_settings(root, emulator.url)
        outcome = asyncio.run(run_service(settings, once=True))
        assert outcome is not None
        print(report(root, outcome, emulator.hub.ledger(), job_table(settings)))
    if keep:
        config = write_config(root, settings)
        print(f"\nThe folders are kept. Try: ldx-hotfolder jobs -c {config}")
    else:
        print(
            f"\nThe demo folder {root} is deleted now. To keep it and try the other "
            "commands on it: ldx-hotfolder demo --keep DIR"
        )
    ok = expected(outcome)
    print("\nDemo finished: all good scans converted." if ok else "\nDemo did NOT go as expected.")
    return 0 if ok else 1
