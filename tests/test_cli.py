"""The command line: help texts, configuration errors, and the operator views."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.cli import build_parser, main
from daemon.emulator.server import EmulatorServer
from daemon.store import NewJob, Stage, Store
from tests.conftest import daemon_config, write_config

SUBCOMMANDS = ["run", "once", "status", "jobs", "retry", "engines", "check", "emulator", "demo"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each subcommand prints help naming -c/--config and exits 0."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    assert len(out.splitlines()) > 3


def test_parser_lists_every_subcommand() -> None:
    """The top-level help names every subcommand of the contract."""
    text = build_parser().format_help()
    for command in SUBCOMMANDS:
        assert command in text


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
        ({"inbox": "/nonexistent/inbox"}, {"api_key": "k"}, "does not exist"),
        ({"outbox": "INBOX/out"}, {"api_key": "k"}, "inside the inbox"),
        ({}, {"output_format": "odt"}, "hub.output_format"),
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
    if top["outbox"].startswith("INBOX"):
        top["outbox"] = top["outbox"].replace("INBOX", str(folders["inbox"]))
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
    ok = store.enqueue(NewJob("a/ok.pdf", 1, 1, 1, "pdf", "ki/ocr", "jpn", "docx"), "a/ok.docx", 1)
    store.advance(ok.id, Stage.DONE, 2.0, remote_job_id="r" * 32)
    bad = store.enqueue(NewJob("b.pdf", 1, 1, 2, "pdf", "ki/ocr", "jpn", "docx"), "b.docx", 1)
    store.advance(bad.id, Stage.FAILED, 3.0, error_code="invalid_input", error_message="broken")
    store.enqueue(NewJob("c.png", 1, 1, 3, "png", "ki/ocr", "jpn", "docx"), "c.docx", 4.0)
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
    """retry re-queues a failed job by path or id; unknown targets are named, exit 1."""
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
