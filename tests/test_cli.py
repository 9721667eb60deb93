"""The command line: help texts, configuration errors, and the operator views."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from daemon.cli import build_parser, main
from daemon.emulator.server import EmulatorServer
from daemon.jobs.model import NewJob, Stage
from daemon.jobs.store import Store
from daemon.ops.health import Heartbeat, write_heartbeat
from tests.conftest import daemon_config, write_config
from tests.helpers import enqueue
from tests.tooling import free_port

SUBCOMMANDS = [  # the contract (design.md); the parser may not drop any of them
    "run",
    "once",
    "status",
    "jobs",
    "usage",
    "retry",
    "purge",
    "health",
    "engines",
    "explain",
    "check",
    "emulator",
    "demo",
]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand the parser has, by name."""
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_parser_has_every_subcommand_of_the_contract() -> None:
    """Each subcommand of the contract exists and is listed, with its summary, in --help."""
    assert set(SUBCOMMANDS) <= set(subparsers())
    text = build_parser().format_help()
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for choice in action._choices_actions:
        assert choice.help, f"{choice.dest} has no summary"
        assert choice.dest in text


@pytest.mark.parametrize("command", sorted(subparsers()))
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every subcommand's help names -c/--config, exits 0 and describes each option and argument."""
    # Covers all the subcommands the parser has.
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    assert len(out.splitlines()) > 3
    parser = subparsers()[command]
    assert parser.description
    undocumented = [a.dest for a in parser._actions if not a.help and a.help != argparse.SUPPRESS]
    assert undocumented == []


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def base(folders: dict[str, Path]) -> dict[str, str]:
    return {
        "inbox": str(folders["inbox"]),
        "outbox": str(folders["outbox"]),
        "state_db": str(folders["state"] / "state.db"),
    }


@pytest.mark.parametrize(
    ("change", "hub", "expected"),
    [
        ({"colour": "blue"}, {}, "colour: unknown key"),
        ({"inbox": "/nonexistent/inbox"}, {"api_key": "k"}, "inbox /nonexistent/inbox does not"),
        ({"outbox": "INBOX/out"}, {"api_key": "k"}, "/out is inside the inbox"),
        ({"state_db": "INBOX/state.db"}, {"api_key": "k"}, "/state.db is inside the inbox"),
        ({}, {"output_format": "odt"}, "hub.output_format: Input should be 'docx', 'xlsx' or"),
    ],
)
@pytest.mark.parametrize("command", ["once", "run", "check"])
def test_configuration_errors_exit_2(
    tmp_path: Path,
    folders: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    hub: dict[str, str],
    expected: str,
    command: str,
) -> None:
    """Unknown key, missing inbox, nested outbox, bad format: exit 2 naming the problem."""
    top = {**base(folders), **change}
    for key in ("outbox", "state_db"):
        top[key] = top[key].replace("INBOX", str(folders["inbox"]))
    config = write_config(tmp_path / "c.toml", top, hub)
    code, out = run_main([command, "-c", str(config)], capsys)
    assert code == 2
    assert expected in out


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A configuration file that is not there is named in the error."""
    code, out = run_main(["status", "-c", str(tmp_path / "none.toml")], capsys)
    assert code == 2
    assert "none.toml does not exist" in out


def seeded_store(folders: dict[str, Path]) -> Store:
    store = Store(f"sqlite:///{folders['state'] / 'state.db'}")
    ok = enqueue(store, NewJob("a/ok.pdf", 1, 1, 1, "pdf", "ki/ocr", "jpn", "docx"), "a/ok.docx", 1)
    store.advance(ok.id, Stage.DONE, 2.0, remote_job_id="r" * 32)
    bad = enqueue(store, NewJob("b.pdf", 1, 1, 2, "pdf", "ki/ocr", "jpn", "docx"), "b.docx", 1)
    store.advance(bad.id, Stage.FAILED, 3.0, error_code="invalid_input", error_message="broken")
    enqueue(store, NewJob("c.png", 1, 1, 3, "png", "ki/ocr", "jpn", "docx"), "c.docx", 4.0)
    return store


def test_status_and_jobs_json_shapes(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """status --json has counts; jobs --json has path, status, output, error, remote_job_id."""
    seeded_store(folders).close()
    config = write_config(tmp_path / "c.toml", base(folders))
    code, out = run_main(["status", "--json", "-c", str(config)], capsys)
    assert code == 0
    status = json.loads(out)
    assert status["counts"] == {"queued": 1, "processing": 0, "completed": 1, "failed": 1}
    assert status["recent_failures"][0]["error"]["message"] == "broken"
    code, out = run_main(["jobs", "--json", "-c", str(config)], capsys)
    jobs = {j["path"]: j for j in json.loads(out)}
    assert jobs["a/ok.pdf"]["output"] == "a/ok.docx"
    assert jobs["a/ok.pdf"]["error"] is None
    assert jobs["a/ok.pdf"]["remote_job_id"] == "r" * 32
    assert jobs["b.pdf"]["error"] == {"code": "invalid_input", "message": "broken"}
    assert jobs["b.pdf"]["output"] is None
    assert jobs["c.png"]["status"] == "queued"
    code, out = run_main(["jobs", "--status", "failed", "--json", "-c", str(config)], capsys)
    assert [j["path"] for j in json.loads(out)] == ["b.pdf"]


def test_status_text_lists_failures(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The human status view shows counts and the failure reason."""
    seeded_store(folders).close()
    config = write_config(tmp_path / "c.toml", base(folders))
    code, out = run_main(["status", "-c", str(config)], capsys)
    assert code == 0
    assert "failed: 1" in out
    assert "b.pdf: broken [invalid_input]" in out


def test_retry_by_path_id_and_failed(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """retry re-queues by path or id; unknown ones named, exit 1; jobs plus --failed: exit 2."""
    # It re-queues failed jobs; naming jobs together with --failed is refused.
    seeded_store(folders).close()
    config = write_config(tmp_path / "c.toml", base(folders))
    code, out = run_main(["retry", "b.pdf", "-c", str(config)], capsys)
    assert code == 0
    assert "requeued 1 job(s)" in out
    code, out = run_main(["retry", "--failed", "-c", str(config)], capsys)
    assert "requeued 0 job(s)" in out
    code, out = run_main(["retry", "nope.pdf", "-c", str(config)], capsys)
    assert code == 1
    assert "not found: nope.pdf" in out
    code, out = run_main(["retry", "-c", str(config)], capsys)
    assert code == 2
    with pytest.raises(SystemExit) as both:  # named jobs or --failed, never both
        main(["retry", "b.pdf", "--failed", "-c", str(config)])
    assert both.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    code, out = run_main(["retry", "--failed", "--json", "-c", str(config)], capsys)
    assert json.loads(out) == {"requeued": [], "not_found": []}


def test_engines_lists_languages(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """engines shows the hub's engines, languages and conversions."""
    config = daemon_config(tmp_path, folders, emulator.url)
    code, out = run_main(["engines", "-c", str(config)], capsys)
    assert code == 0
    assert "ki/ocr" in out
    assert "jpn" in out
    assert "pdf->docx" in out
    code, out = run_main(["engines", "--json", "-c", str(config)], capsys)
    assert json.loads(out)[0]["id"] == "ki/ocr"


def test_check_accepts_good_setup(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """check passes when folders and key are fine."""
    config = daemon_config(tmp_path, folders, emulator.url)
    code, out = run_main(["check", "-c", str(config)], capsys)
    assert code == 0, out
    assert "api key: accepted" in out


# -- operator views: status at a glance, job filters, purge --------------------------------

HOUR = 3600.0


def aged_store(folders: dict[str, Path], now: float) -> Store:
    """Jobs of several ages, statuses and folders, relative to ``now``."""
    store = Store(f"sqlite:///{folders['state'] / 'state.db'}")

    def job(path: str, inode: int, created: float) -> int:
        new = NewJob(path, 1, 1, inode, "pdf", "ki/ocr", "jpn", "docx")
        return enqueue(store, new, path.rsplit(".", 1)[0] + ".docx", created).id

    old_done = job("invoices/2024/a.pdf", 1, now - 40 * 24 * HOUR)
    store.advance(old_done, Stage.DONE, now - 40 * 24 * HOUR + 60)
    gone_done = job("invoices/2024/gone.pdf", 2, now - 39 * 24 * HOUR)
    store.advance(gone_done, Stage.DONE, now - 39 * 24 * HOUR + 60)
    superseded = job("letters/b.pdf", 3, now - 38 * 24 * HOUR)
    store.advance(superseded, Stage.DONE, now - 38 * 24 * HOUR + 60)
    newer = job("letters/b.pdf", 4, now - 2 * HOUR)
    store.advance(newer, Stage.DONE, now - 2 * HOUR + 60)
    old_failed = job("letters/c.pdf", 5, now - 35 * 24 * HOUR)
    store.advance(
        old_failed,
        Stage.FAILED,
        now - 35 * 24 * HOUR,
        error_code="invalid_input",
        error_message="the PDF file is damaged",
    )
    job("invoices/2025/waiting.pdf", 6, now - 3 * HOUR)
    return store


def test_jobs_filter_by_status_path_and_age(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--path takes a glob or a folder, --older-than/--newer-than the queue time, with --json."""
    aged_store(folders, time.time()).close()
    config = str(write_config(tmp_path / "c.toml", base(folders)))

    def paths(*args: str) -> list[str]:
        code, out = run_main(["jobs", "--json", "-c", config, *args], capsys)
        assert code == 0, out
        return [j["path"] for j in json.loads(out)]

    assert paths("--path", "invoices") == [
        "invoices/2025/waiting.pdf",
        "invoices/2024/gone.pdf",
        "invoices/2024/a.pdf",
    ]
    assert paths("--path", "*/b.pdf") == ["letters/b.pdf", "letters/b.pdf"]
    assert paths("--path", "invoices/2024/a.pdf") == ["invoices/2024/a.pdf"]
    assert paths("--newer-than", "1d") == ["invoices/2025/waiting.pdf", "letters/b.pdf"]
    assert paths("--older-than", "36d", "--status", "completed") == [
        "letters/b.pdf",
        "invoices/2024/gone.pdf",
        "invoices/2024/a.pdf",
    ]
    assert paths("--path", "letters", "--limit", "1") == ["letters/c.pdf"]
    with pytest.raises(SystemExit):
        main(["jobs", "--older-than", "soon", "-c", config])
    assert "not a duration" in capsys.readouterr().err


def test_purge_keeps_what_the_daemon_still_needs(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Old final jobs go, except the newest job of an input still in the inbox."""
    aged_store(folders, time.time()).close()
    (folders["inbox"] / "invoices" / "2024").mkdir(parents=True)
    (folders["inbox"] / "invoices" / "2024" / "a.pdf").write_bytes(b"%PDF-1.4 kept")
    config = str(write_config(tmp_path / "c.toml", base(folders)))
    code, out = run_main(["purge", "-c", config, "--older-than", "30d"], capsys)
    assert code == 2
    assert "--completed" in out
    code, out = run_main(
        ["purge", "--completed", "--older-than", "30d", "--dry-run", "--json", "-c", config], capsys
    )
    assert json.loads(out) == {"purged": 0, "planned": 2, "kept": 1, "dry_run": True}
    code, out = run_main(
        ["purge", "--completed", "--failed", "--older-than", "30d", "-c", config], capsys
    )
    assert code == 0
    assert "purged 3 job(s); kept 1" in out
    code, out = run_main(["jobs", "--json", "-c", config], capsys)
    left = sorted(j["path"] for j in json.loads(out))
    assert left == ["invoices/2024/a.pdf", "invoices/2025/waiting.pdf", "letters/b.pdf"]


def test_status_screen_at_a_glance(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Counts, the oldest wait, recent failures with reasons, daemon health, hub not checked."""
    now = time.time()
    aged_store(folders, now).close()
    write_heartbeat(
        folders["state"] / "heartbeat.json",
        Heartbeat(time=now, pid=77, started_at=now - 60, healthy=True, in_flight=2),
    )
    config = str(write_config(tmp_path / "c.toml", base(folders)))
    code, out = run_main(["status", "-c", config], capsys)
    assert code == 0
    assert "daemon   healthy (pid 77" in out
    assert "2 in flight" in out
    assert "hub      https://gw.ldxhub.io: not checked: no API key" in out
    assert "the daemon reports no trouble with the hub" in out
    assert "queued: 1  processing: 0  completed: 4  failed: 1" in out
    assert "the oldest unfinished job was queued 3.0 h ago" in out
    assert "letters/c.pdf: the PDF file is damaged [invalid_input] (35.0 d ago)" in out
    code, out = run_main(["status", "--json", "-c", config], capsys)
    status = json.loads(out)
    assert 3 * HOUR - 60 < status["oldest_waiting_seconds"] < 3 * HOUR + 60
    assert status["daemon"]["healthy"] is True
    assert status["daemon"]["pid"] == 77
    assert status["hub"]["reachable"] is None
    (folders["state"] / "heartbeat.json").unlink()
    code, out = run_main(["status", "-c", config], capsys)
    assert "daemon   NOT OK: no heartbeat: the daemon is not running" in out


def test_status_checks_the_hub_and_the_key(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """status says whether the hub answers and accepts the key; --no-hub skips the call."""
    config = str(daemon_config(tmp_path, folders, emulator.url))
    code, out = run_main(["status", "-c", config], capsys)
    assert "reachable, API key accepted" in out
    code, out = run_main(["status", "--no-hub", "-c", config], capsys)
    assert "not checked: skipped" in out
    config = str(daemon_config(tmp_path, folders, emulator.url, key="not-the-demo-key"))
    code, out = run_main(["status", "--json", "-c", config], capsys)
    hub = json.loads(out)["hub"]
    assert (hub["reachable"], hub["key_accepted"]) == (True, False)
    config = str(daemon_config(tmp_path, folders, f"http://127.0.0.1:{free_port()}"))
    code, out = run_main(["status", "-c", config], capsys)
    assert code == 0
    assert "UNREACHABLE" in out
