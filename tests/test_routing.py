"""Routing rules and hooks end to end: the daemon against a real emulator on loopback."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import load_settings
from daemon.emulator.server import EmulatorServer
from daemon.ooxml import verify_package
from daemon.service import run_service
from tests.conftest import daemon_config
from tests.faults import job_rows
from tests.scans import make_scan

RULES = """
[[rules]]
match = "invoices/**"
output_format = "xlsx"
language = "eng"

[[rules]]
match = "slides/**"
output_format = "pptx"
"""


def with_rules(config: Path, text: str) -> Path:
    config.write_text(config.read_text(encoding="utf-8") + text, encoding="utf-8")
    return config


def drop(inbox: Path, rel: str, seed: int) -> None:
    (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
    (inbox / rel).write_bytes(make_scan("pdf", seed))


def test_rules_route_formats_and_languages(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Three routed folders give xlsx, pptx and docx; the hub saw the routed parameters."""
    for i, rel in enumerate(["invoices/2026/a.pdf", "slides/deck.pdf", "letters/b.pdf"]):
        drop(folders["inbox"], rel, i)
    (folders["inbox"] / "letters" / ".ldx-hotfolder.toml").write_text(
        'language = "Auto"\n', encoding="utf-8"
    )
    config = with_rules(daemon_config(tmp_path, folders, emulator.url), RULES)
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.exit_code == 0
    outbox = folders["outbox"]
    verify_package(outbox / "invoices/2026/a.xlsx", "xlsx")
    verify_package(outbox / "slides/deck.pptx", "pptx")
    verify_package(outbox / "letters/b.docx", "docx")
    sent = {(job["output_format"], job["languages"][0]) for job in emulator.hub.ledger()["jobs"]}
    assert sent == {("xlsx", "eng"), ("pptx", "jpn"), ("docx", "Auto")}
    rules = {row["path"]: row["rule"] for row in job_rows(folders["state"] / "state.db")}
    assert rules == {
        "invoices/2026/a.pdf": "rules[1] invoices/**",
        "slides/deck.pdf": "rules[2] slides/**",
        "letters/b.pdf": "folder letters/.ldx-hotfolder.toml",
    }


def test_invalid_rule_exits_2_naming_it(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A language the hub does not offer stops the start, naming the rule and the choices."""
    config = with_rules(
        daemon_config(tmp_path, folders, emulator.url),
        '\n[[rules]]\nmatch = "fr/**"\nlanguage = "french"\n',
    )
    assert main(["once", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "rules[1] (match 'fr/**')" in err
    assert "language 'french' is not offered" in err
    assert "jpn" in err
    assert emulator.hub.ledger()["uploads"] == []


def test_bad_folder_file_fails_only_its_files(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A folder file with a bad value fails the files below it, with that reason."""
    drop(folders["inbox"], "odd/x.pdf", 1)
    drop(folders["inbox"], "fine/y.pdf", 2)
    (folders["inbox"] / "odd" / ".ldx-hotfolder.toml").write_text(
        'language = "martian"\n', encoding="utf-8"
    )
    config = daemon_config(tmp_path, folders, emulator.url)
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.completed == ["fine/y.pdf"]
    assert outcome.failed == ["odd/x.pdf"]
    row = next(r for r in job_rows(folders["state"] / "state.db") if r["path"] == "odd/x.pdf")
    assert row["error_code"] == "bad_folder_settings"
    assert "language 'martian' is not offered" in row["error_message"]


DUMP = (
    "import json, os, sys; "
    "json.dump({k: v for k, v in os.environ.items() if k.startswith('LDX_')}, "
    "open(os.path.join(sys.argv[1], os.environ['LDX_JOB_ID'] + '.json'), 'w'))"
)


def test_hooks_run_and_a_hanging_one_never_holds_up_work(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Success and failure hooks get the job's facts; a hanging hook is killed, work goes on."""
    seen = tmp_path / "seen"
    seen.mkdir()
    for i in range(3):
        drop(folders["inbox"], f"ok/{i}.pdf", i)
    (folders["inbox"] / "bad.pdf").write_bytes(b"%PDF-1.3\nnot a pdf\n%%EOF\n")
    hooks = (
        "\n[hooks]\n"
        f"on_completed = {json.dumps([sys.executable, '-c', DUMP, str(seen)])}\n"
        f"on_failed = {json.dumps([sys.executable, '-c', 'import time; time.sleep(60)'])}\n"
        "timeout = 1.0\n"
    )
    config = with_rules(daemon_config(tmp_path, folders, emulator.url), hooks)
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.failed == ["bad.pdf"]
    assert len(outcome.completed) == 3
    envs = [json.loads(p.read_text()) for p in seen.glob("*.json")]
    assert sorted(e["LDX_INPUT_REL"] for e in envs) == ["ok/0.pdf", "ok/1.pdf", "ok/2.pdf"]
    assert all(e["LDX_STATUS"] == "completed" for e in envs)
    assert all(Path(e["LDX_OUTPUT"]).exists() for e in envs)
    bad = next(r for r in job_rows(folders["state"] / "state.db") if r["path"] == "bad.pdf")
    assert bad["status"] == "failed"
    assert "killed after 1 s" in bad["hook_error"]
    assert main(["status", "--no-hub", "-c", str(config)]) == 0
    screen = capsys.readouterr().out
    assert "hooks that failed" in screen
    assert "bad.pdf: hook" in screen
