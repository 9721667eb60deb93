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
language = "deu"

[[rules]]
match = "letters/**"
output_format = "docx"
language = "fra"
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
    """Three rule-routed folders give xlsx, pptx and docx, a folder file and the defaults
    route the rest; the hub's ledger shows each job's routed format and language."""
    expected = {  # path: (output, format, language, the rule recorded on the row)
        "invoices/2026/a.pdf": ("invoices/2026/a.xlsx", "xlsx", "eng", "rules[1] invoices/**"),
        "slides/deck.pdf": ("slides/deck.pptx", "pptx", "deu", "rules[2] slides/**"),
        "letters/b.pdf": ("letters/b.docx", "docx", "fra", "rules[3] letters/**"),
        "memos/c.pdf": ("memos/c.docx", "docx", "Auto", "folder memos/.ldx-hotfolder.toml"),
        "loose.pdf": ("loose.docx", "docx", "jpn", "defaults"),
    }
    for i, rel in enumerate(expected):
        drop(folders["inbox"], rel, i)
    (folders["inbox"] / "memos" / ".ldx-hotfolder.toml").write_text(
        'language = "Auto"\n', encoding="utf-8"
    )
    config = with_rules(daemon_config(tmp_path, folders, emulator.url), RULES)
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.exit_code == 0
    assert sorted(outcome.completed) == sorted(expected)
    created = {job["job_id"]: job for job in emulator.hub.ledger()["jobs"]}
    assert len(created) == len(expected)
    seen = {}
    for row in job_rows(folders["state"] / "state.db"):
        job = created[row["remote_job_id"]]
        seen[row["path"]] = (row["output"], job["output_format"], job["languages"][0], row["rule"])
        # The row records the settings it was converted with, as the hub got them.
        assert (row["output_format"], row["language"]) == (
            job["output_format"],
            job["languages"][0],
        )
        verify_package(folders["outbox"] / row["output"], job["output_format"])
    assert seen == expected


@pytest.mark.parametrize(
    ("field", "named"),
    [
        (
            'language = "french"',
            "rules[2] (match 'fr/**'): language 'french' is not offered by ki/ocr "
            "(valid: Auto, deu, eng, fra, jpn, kor, spa, zho)",
        ),
        (
            'engine = "tesseract"',
            "rules[2] (match 'fr/**'): engine 'tesseract' is not offered (valid: ki/ocr)",
        ),
        (
            'output_format = "pdf"',
            "rules[2].output_format: Input should be 'docx', 'xlsx' or 'pptx' (got 'pdf')",
        ),
    ],
)
def test_invalid_rule_exits_2_naming_it(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
    field: str,
    named: str,
) -> None:
    """A value the hub does not offer stops the start, naming the rule and the choices."""
    drop(folders["inbox"], "fr/a.pdf", 1)
    config = with_rules(
        daemon_config(tmp_path, folders, emulator.url),
        f'\n[[rules]]\nmatch = "en/**"\nlanguage = "eng"\n\n[[rules]]\nmatch = "fr/**"\n{field}\n',
    )
    assert main(["once", "-c", str(config)]) == 2
    assert named in capsys.readouterr().err
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
