"""Routing rules and hooks end to end: the daemon against a real emulator on loopback."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from daemon.config import load_settings
from daemon.emulator.server import EmulatorServer
from daemon.outbox.verify import verify_package
from daemon.service import run_service
from tests.conftest import WebhookReceiver, daemon_config
from tests.faults import job_rows
from tests.helpers import alive, cli, daemon_in_process, jobs_json, wait_async
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
    """Rules route three folders to xlsx, pptx, docx; a folder file and defaults route the rest."""
    # The hub's ledger shows each job's routed format and language.
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
    # jobs and explain show the settings and the rule that chose them
    listed = {j["path"]: j for j in jobs_json(config)}
    assert (
        listed["invoices/2026/a.pdf"]["output_format"],
        listed["invoices/2026/a.pdf"]["rule"],
    ) == (
        "xlsx",
        "rules[1] invoices/**",
    )
    assert listed["slides/deck.pdf"]["language"] == "deu"
    assert listed["slides/deck.pdf"]["engine"] == "ki/ocr"
    explained = cli(config, "explain", "slides/deck.pdf")
    assert explained.returncode == 0, explained.stderr
    assert "engine ki/ocr, language deu, format pptx, chosen by rules[2] slides/**" in (
        " ".join(explained.stdout.split())
    )


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


def test_folder_file_archiving_without_archive_dir_fails_its_files(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A folder file saying on_success = archive, with no archive_dir set, fails its files."""
    drop(folders["inbox"], "odd/x.pdf", 1)
    (folders["inbox"] / "odd" / ".ldx-hotfolder.toml").write_text(
        'on_success = "archive"\n', encoding="utf-8"
    )
    config = daemon_config(tmp_path, folders, emulator.url)
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.failed == ["odd/x.pdf"]
    assert (folders["inbox"] / "odd" / "x.pdf").exists()
    row = next(r for r in job_rows(folders["state"] / "state.db") if r["path"] == "odd/x.pdf")
    assert row["error_code"] == "bad_folder_settings"
    assert row["error_message"] == (
        "folder odd/.ldx-hotfolder.toml: on_success = 'archive' needs archive_dir, "
        "which the daemon's configuration does not set"
    )


# Hook commands: write the LDX_* variables (plus pid and start time) to a file in argv[1],
# atomically, named by the hook's kind and job id; the failure hook then hangs.
DUMP = (
    "import json, os, sys, time; "
    "env = {k: v for k, v in os.environ.items() if k.startswith('LDX_')}; "
    "env.update(pid=os.getpid(), started=time.monotonic()); "
    "name = os.path.join(sys.argv[1], sys.argv[2] + '-' + env['LDX_JOB_ID']); "
    "json.dump(env, open(name + '.tmp', 'w')); os.rename(name + '.tmp', name + '.json')"
)
HANG = DUMP + "; time.sleep(3600)"
HANG_TIMEOUT = 8.0  # long enough for three files to convert while the hook hangs


def test_hooks_get_the_facts_and_a_hanging_one_never_holds_up_work(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Success and failure hooks get the job's facts; a hanging one never holds up other files."""
    # The hanging failure hook is killed at its timeout; the job stays as it was; status shows it.
    seen = tmp_path / "seen"
    seen.mkdir()
    hooks = (
        "\n[hooks]\n"
        f"on_completed = {json.dumps([sys.executable, '-c', DUMP, str(seen), 'ok'])}\n"
        f"on_failed = {json.dumps([sys.executable, '-c', HANG, str(seen), 'failed'])}\n"
        f"timeout = {HANG_TIMEOUT}\n"
    )
    config = with_rules(daemon_config(tmp_path, folders, emulator.url), hooks)
    db = folders["state"] / "state.db"

    def row(path: str) -> dict[str, Any]:
        return next(r for r in job_rows(db) if r["path"] == path)

    def envs(kind: str) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in seen.glob(f"{kind}-*.json")]

    async def scenario() -> dict[str, Any]:
        async with daemon_in_process(load_settings(config)):
            before_hook = time.monotonic()
            (folders["inbox"] / "bad.pdf").write_bytes(b"%PDF-1.3\nnot a pdf\n%%EOF\n")
            await wait_async(lambda: envs("failed"), 30, "the failure hook to start")
            hung = envs("failed")[0]
            for i in range(3):
                drop(folders["inbox"], f"ok/{i}.pdf", i)
            await wait_async(
                lambda: [r["status"] for r in job_rows(db)].count("completed") == 3,
                HANG_TIMEOUT - 2,
                "three files to convert while the failure hook hangs",
            )
            assert alive(hung["pid"]), "the hook was still hanging"
            assert row("bad.pdf")["hook_error"] is None
            await wait_async(lambda: len(envs("ok")) == 3, 20, "the three success hooks")
            await wait_async(lambda: row("bad.pdf")["hook_error"], 20, "the hook to be killed")
            assert time.monotonic() - before_hook >= HANG_TIMEOUT, "not killed early"
            await wait_async(lambda: not alive(hung["pid"]), 5, "the hook to be gone")
            return hung

    hung = asyncio.run(scenario())
    bad = row("bad.pdf")
    assert bad["status"] == "failed"
    assert hung["LDX_JOB_ID"] == str(bad["id"])
    assert hung["LDX_STATUS"] == "failed"
    assert (hung["LDX_INPUT"], hung["LDX_INPUT_REL"]) == (
        str(folders["inbox"] / "bad.pdf"),
        "bad.pdf",
    )
    assert (hung["LDX_ERROR_CODE"], hung["LDX_ERROR_MESSAGE"]) == (
        bad["error_code"],
        bad["error_message"],
    )
    assert bad["error_code"]
    assert hung["LDX_OUTPUT"] == ""
    assert bad["hook_error"].endswith(f"was killed after {HANG_TIMEOUT:g} s")
    for env in envs("ok"):
        done = row(env["LDX_INPUT_REL"])
        assert done["status"] == "completed"  # the kill changed no conversion
        assert (env["LDX_JOB_ID"], env["LDX_STATUS"]) == (str(done["id"]), "completed")
        assert env["LDX_OUTPUT"] == str(folders["outbox"] / done["output"])
        assert env["LDX_OUTPUT_REL"] == done["output"]
        assert env["LDX_REMOTE_JOB_ID"] == done["remote_job_id"]
        assert (env["LDX_ERROR_CODE"], env["LDX_RULE"]) == ("", done["rule"])
        assert done["hook_error"] is None
    assert sorted(e["LDX_INPUT_REL"] for e in envs("ok")) == ["ok/0.pdf", "ok/1.pdf", "ok/2.pdf"]
    assert main(["status", "--no-hub", "-c", str(config)]) == 0
    screen = capsys.readouterr().out
    assert "hooks that failed" in screen
    assert "bad.pdf: hook" in screen


def test_webhook_retried_after_a_500_from_the_receiver(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    receiver: tuple[str, type[WebhookReceiver]],
) -> None:
    """Webhook resent after the receiver's 500; no hook failure recorded; conversion untouched."""
    url, handler = receiver
    handler.answers[:] = [500]
    drop(folders["inbox"], "invoices/x.pdf", 3)
    hooks = f'\n[hooks]\nwebhook_url = "{url}"\nwebhook_attempts = 3\n'
    config = with_rules(daemon_config(tmp_path, folders, emulator.url), RULES + hooks)
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.completed == ["invoices/x.pdf"]
    assert len(handler.bodies) == 2, "one 500, then the same body again"
    assert handler.bodies[0] == handler.bodies[1]
    (row,) = job_rows(folders["state"] / "state.db")
    body = handler.bodies[1]
    assert (body["event"], body["job_id"], body["path"], body["output"]) == (
        "job.completed",
        row["id"],
        "invoices/x.pdf",
        "invoices/x.xlsx",
    )
    assert (body["rule"], body["remote_job_id"], body["error"]) == (
        "rules[1] invoices/**",
        row["remote_job_id"],
        None,
    )
    assert row["hook_error"] is None
