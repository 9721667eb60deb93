"""The command line: help texts, configuration errors, and the operator views."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from daemon.cli import build_parser, main
from daemon.emulator.server import EmulatorServer
from daemon.jobs.model import NewJob, Stage
from daemon.jobs.store import Store
from daemon.ops.health import Heartbeat
from daemon.ops.healthsock import HealthSocket
from tests.conftest import daemon_config, write_config
from tests.helpers import _env, enqueue
from tests.tooling import REPO, free_port

SUBCOMMANDS = [  # the documented commands; the parser may not drop any of them
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


def test_the_daemon_does_not_load_the_emulator() -> None:
    """Parsing ``run``'s command line loads neither the emulator nor its web stack (a few
    MB a running daemon would keep), while ``emulator`` still gets its options."""
    probe = (
        "import sys\n"
        "from daemon.cli import build_parser\n"
        "build_parser('run').parse_args(['run', '-c', 'x.toml'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'uvicorn', 'starlette'}),"
        " 'daemon.emulator' in sys.modules)\n"
        "build_parser('emulator').parse_args(['emulator', '--port', '0'])\n"
        "print('daemon.emulator' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.splitlines() == ["[] False", "True"]


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
    (folders["inbox"] / "b.pdf").write_bytes(b"%PDF-1.4\n")  # the failed input is still there
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
    assert json.loads(out) == {"requeued": [], "not_found": [], "not_retried": []}


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
    (folders["inbox"] / "letters").mkdir()
    (folders["inbox"] / "letters" / "c.pdf").write_bytes(b"%PDF-1.4\n")  # still failing
    daemon_beat = Heartbeat(time=now, pid=77, started_at=now - 60, healthy=True, in_flight=2)
    answer = HealthSocket(folders["state"] / "health.sock", lambda: daemon_beat).start()
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
    answer.close()
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


# -- check refuses what run refuses ----------------------------------------------------

STUB_ENGINES = {
    "data": [
        {
            "id": "ki/ocr",
            "supported_languages": [{"code": "jpn"}, {"code": "eng"}],
            "supported_conversions": [{"from": "pdf", "to": "docx"}, {"from": "png", "to": "pptx"}],
        },
        {
            "id": "other/ocr",
            "supported_languages": [{"code": "eng"}],
            "supported_conversions": [{"from": "pdf", "to": "xlsx"}],
        },
    ]
}


class StubHub(BaseHTTPRequestHandler):
    """A hub that lists ``engines`` and answers ``GET /files``; 404 for anything else."""

    engines: ClassVar[object] = STUB_ENGINES

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        found = {"/renderocr/engines": type(self).engines, "/files": {"data": []}}.get(path)
        body = json.dumps(found if found is not None else {"message": "no"}).encode()
        self.send_response(200 if found is not None else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def stub_hub() -> Iterator[tuple[str, type[StubHub]]]:
    """A real loopback HTTP server with its own engine list: its URL and handler class."""
    handler = type("Stub", (StubHub,), {"engines": STUB_ENGINES})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def with_rule(config: Path, **fields: str) -> Path:
    """Append one ``[[rules]]`` entry (match "letters/**") to a configuration file."""
    lines = ["", "[[rules]]", 'match = "letters/**"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    config.write_text(config.read_text(encoding="utf-8") + "\n".join(lines) + "\n", "utf-8")
    return config


NOT_OFFERED = [
    (
        {"engine": "nope/ocr"},
        {},
        "[hub]: engine 'nope/ocr' is not offered (valid: ki/ocr, other/ocr)",
    ),
    ({"language": "fra"}, {}, "[hub]: language 'fra' is not offered by ki/ocr (valid: eng, jpn)"),
    ({"output_format": "xlsx"}, {}, "[hub]: output format 'xlsx' is not offered by ki/ocr"),
    ({}, {"engine": "nope/ocr"}, "rules[1] (match 'letters/**'): engine 'nope/ocr' is not"),
    ({}, {"engine": "other/ocr"}, "rules[1] (match 'letters/**'): language 'jpn' is not offered"),
    ({}, {"language": "fra"}, "rules[1] (match 'letters/**'): language 'fra' is not offered"),
    ({}, {"output_format": "pptx", "engine": "other/ocr", "language": "eng"}, "format 'pptx'"),
]


@pytest.mark.parametrize(("hub", "rule", "expected"), NOT_OFFERED)
def test_check_and_run_refuse_the_same_with_the_same_words(
    tmp_path: Path,
    folders: dict[str, Path],
    stub_hub: tuple[str, type[StubHub]],
    capsys: pytest.CaptureFixture[str],
    hub: dict[str, str],
    rule: dict[str, str],
    expected: str,
) -> None:
    """An engine, language or format the hub does not list, in [hub] or a rule: exit 2 and one
    identical message from ``check`` and from ``run``."""
    config = daemon_config(tmp_path, folders, stub_hub[0], hub=hub)
    if rule:
        with_rule(config, **rule)
    said = {}
    for command in ("check", "run"):
        capsys.readouterr()
        assert main([command, "-c", str(config)]) == 2, command
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("ldx-hotfolder: configuration")]
        said[command] = line
    assert said["check"] == said["run"]
    assert said["check"].startswith(
        "ldx-hotfolder: configuration error: the hub does not offer what is configured: "
    )
    assert expected in said["check"]


@pytest.mark.parametrize(
    "engines",
    [
        {"data": []},
        {"engines": "none"},
        {"data": [{"id": "ki/ocr"}, {"id": "other/ocr"}]},
        ["ki/ocr"],
    ],
    ids=["empty", "unreadable", "no_lists", "strings"],
)
def test_check_takes_an_empty_or_thin_engine_list_as_advice(
    tmp_path: Path,
    folders: dict[str, Path],
    stub_hub: tuple[str, type[StubHub]],
    capsys: pytest.CaptureFixture[str],
    engines: object,
) -> None:
    """No list, or one without languages and formats: check passes what only the hub can judge."""
    # The engine id is still checked when the list names engines.
    url, handler = stub_hub
    handler.engines = engines
    config = daemon_config(tmp_path, folders, url, hub={"language": "fra"})
    code, out = run_main(["check", "-c", str(config)], capsys)
    assert code == 0, out
    assert "hub offer: " in out
    listed = engines not in ({"data": []}, {"engines": "none"})
    assert ("hub offer: ok" in out) is listed
    assert ("the hub's answer to each job decides" in out) is not listed
    bad = daemon_config(tmp_path, folders, url, hub={"engine": "nope/ocr"})
    assert (main(["check", "-c", str(bad)]) == 2) is listed


def test_retry_of_a_job_that_did_not_fail_says_why(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``retry 1`` on a completed job: exit 1 and why, not "requeued 0 job(s)" and 0."""
    seeded_store(folders).close()
    config = str(write_config(tmp_path / "c.toml", base(folders)))
    code, out = run_main(["retry", "1", "-c", config], capsys)
    assert code == 1
    assert "not retried: #1 a/ok.pdf: it completed, so there is nothing to retry" in out
    code, out = run_main(["retry", "c.png", "-c", config], capsys)
    assert code == 1
    assert "not retried: #3 c.png: it is queued already" in out
    assert main(["retry", "1", "--json", "-c", config]) == 1
    assert json.loads(capsys.readouterr().out)["not_retried"][0]["status"] == "completed"


def test_engines_shows_lists_the_hub_leaves_out(
    tmp_path: Path,
    folders: dict[str, Path],
    stub_hub: tuple[str, type[StubHub]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An engine listed without languages or conversions is shown as such, not a crash."""
    url, handler = stub_hub
    handler.engines = {"data": [{"id": "ki/ocr"}]}
    code, out = run_main(["engines", "--base-url", url], capsys)
    assert code == 0, out
    assert "languages: (not listed)" in out
    assert "conversions: (not listed)" in out


@pytest.mark.parametrize(
    "args", [["jobs"], ["jobs", "--json"], ["status", "--json", "--no-hub"], ["engines", "--json"]]
)
def test_output_into_a_closed_pipe_is_no_traceback(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, args: list[str]
) -> None:
    """``jobs | head`` and the like: the reader went away; exit 141, nothing on stderr."""
    seeded_store(folders).close()
    config = daemon_config(tmp_path, folders, emulator.url)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as ``head`` after a line
    try:
        result = subprocess.run(
            [sys.executable, "-m", "daemon", *args, "-c", str(config)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=_env(),
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141


def test_a_daemon_package_that_is_not_ours_is_named(tmp_path: Path) -> None:
    """python-daemon's ``daemon`` over ours in one environment: a clear sentence, exit 2."""
    # As pip leaves it when both distributions go into one environment: our modules with
    # python-daemon's __init__.py (and its own modules) in the same folder.
    site = tmp_path / "site"
    shutil.copytree(
        REPO / "daemon", site / "daemon", ignore=shutil.ignore_patterns("__pycache__", "demo_scans")
    )
    (site / "daemon" / "__init__.py").write_text(
        '"""Library to implement a well-behaved Unix daemon process."""\n'
        "from .daemon import DaemonContext\n",
        encoding="utf-8",
    )
    (site / "daemon" / "daemon.py").write_text("class DaemonContext:\n    pass\n", "utf-8")
    env = {**_env(), "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        f"the Python package 'daemon' in {site / 'daemon'} is not ldx-hotfolder's" in result.stderr
    )
    assert "python-daemon" in result.stderr
    assert "virtual environment of its own" in result.stderr
    assert "pipx" in result.stderr
