"""Completion hooks: commands with the job's environment, timeouts, and retried webhooks."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from daemon.config import HookSettings
from daemon.pipeline.hooks import HookEvent, Hooks
from tests.conftest import WebhookReceiver
from tests.helpers import alive, wait_async, wait_for


def event(status: str = "completed", job_id: int = 7) -> HookEvent:
    return HookEvent(
        job_id=job_id,
        status=status,
        input_path=Path("/in/a/scan.pdf"),
        input_rel="a/scan.pdf",
        output_path=Path("/out/a/scan.docx") if status == "completed" else None,
        output_rel="a/scan.docx" if status == "completed" else None,
        remote_job_id="r" * 32,
        error_code="invalid_input" if status == "failed" else None,
        error_message="broken" if status == "failed" else None,
        rule="rules[1] a/**",
    )


DUMP_ENV = (
    "import json, os, sys; "
    "json.dump({k: v for k, v in os.environ.items() if k.startswith('LDX_')}, "
    "open(sys.argv[1], 'w'))"
)


def run_hooks(settings: HookSettings, *events: HookEvent) -> list[tuple[int, str]]:
    failures: list[tuple[int, str]] = []

    async def scenario() -> None:
        hooks = Hooks(settings, lambda job, msg: failures.append((job, msg)))
        for e in events:
            hooks.fire(e)
        await hooks.drain(30)

    asyncio.run(scenario())
    return failures


def test_success_and_failure_hooks_get_the_environment(tmp_path: Path) -> None:
    """on_completed and on_failed receive paths, job id, status and the error."""
    done, failed = tmp_path / "done.json", tmp_path / "failed.json"
    settings = HookSettings(
        on_completed=(sys.executable, "-c", DUMP_ENV, str(done)),
        on_failed=(sys.executable, "-c", DUMP_ENV, str(failed)),
    )
    assert run_hooks(settings, event("completed"), event("failed", job_id=8)) == []
    ok = json.loads(done.read_text())
    assert ok["LDX_STATUS"] == "completed"
    assert ok["LDX_OUTPUT"] == "/out/a/scan.docx"
    assert ok["LDX_INPUT_REL"] == "a/scan.pdf"
    assert ok["LDX_JOB_ID"] == "7"
    bad = json.loads(failed.read_text())
    assert (bad["LDX_STATUS"], bad["LDX_ERROR_CODE"], bad["LDX_ERROR_MESSAGE"]) == (
        "failed",
        "invalid_input",
        "broken",
    )
    assert bad["LDX_JOB_ID"] == "8"


def test_hanging_hook_is_killed_at_timeout(tmp_path: Path) -> None:
    """A hook that never ends is killed (children too) and reported, not waited for."""
    child = tmp_path / "child.py"
    child.write_text("import time\ntime.sleep(60)\n", encoding="utf-8")
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, {str(child)!r}])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n",
        encoding="utf-8",
    )
    settings = HookSettings(on_completed=(sys.executable, str(parent)), timeout=1.0)
    failures = run_hooks(settings, event())
    assert failures == [(7, f"hook {sys.executable!r} was killed after 1 s")]
    child_pid = int((tmp_path / "child.pid").read_text())
    wait_for(lambda: not alive(child_pid), 5, "the hook's child to be gone")


def test_a_hook_running_when_the_daemon_stops_is_killed(tmp_path: Path) -> None:
    """A hook still running when drain gives up is killed with it, not left orphaned."""
    pid_file = tmp_path / "hook.pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    settings = HookSettings(on_completed=(sys.executable, "-c", script), timeout=60.0)
    failures: list[tuple[int, str]] = []

    async def scenario() -> None:
        hooks = Hooks(settings, lambda job, msg: failures.append((job, msg)))
        hooks.fire(event())
        await wait_async(lambda: pid_file.exists() and pid_file.read_text(), 10, "the hook")
        await hooks.drain(0.1)

    asyncio.run(scenario())
    assert not alive(int(pid_file.read_text()))
    assert failures == []  # the daemon stopping is not the hook's failure


def test_failing_and_missing_hooks_are_reported() -> None:
    """A non-zero exit and a command that does not exist are failures, not crashes."""
    failing = HookSettings(on_completed=(sys.executable, "-c", "raise SystemExit(3)"))
    assert run_hooks(failing, event())[0][1].endswith("exited with status 3")
    missing = HookSettings(on_completed=("/nonexistent/hook",))
    assert "could not start" in run_hooks(missing, event())[0][1]


def test_webhook_retried_after_500(receiver: tuple[str, type[WebhookReceiver]]) -> None:
    """A 500 from the receiver is retried; the JSON describes the job."""
    url, handler = receiver
    handler.answers[:] = [500, 200]
    assert run_hooks(HookSettings(webhook_url=url), event()) == []
    assert len(handler.bodies) == 2
    body = handler.bodies[-1]
    assert body["event"] == "job.completed"
    assert body["output"] == "a/scan.docx"
    assert body["error"] is None


def test_webhook_gives_up_and_reports(receiver: tuple[str, type[WebhookReceiver]]) -> None:
    """A receiver that keeps failing is given up after the configured attempts."""
    url, handler = receiver
    handler.answers[:] = [503, 503, 503]
    failures = run_hooks(HookSettings(webhook_url=url, webhook_attempts=3), event("failed"))
    assert len(handler.bodies) == 3
    assert "failed after 3 attempt(s): HTTP 503" in failures[0][1]
    assert handler.bodies[0]["error"] == {"code": "invalid_input", "message": "broken"}


DUMP_ALL = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"


def test_a_command_hook_gets_a_minimal_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key, the credentials folder and other daemon variables never reach a hook."""
    monkeypatch.setenv("LDX_HOTFOLDER_HUB__API_KEY", "CANARY-key-in-the-environment")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/ldx-hotfolder.service")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "CANARY-cloud-secret")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    seen = tmp_path / "env.json"
    settings = HookSettings(on_failed=(sys.executable, "-c", DUMP_ALL, str(seen)))
    assert run_hooks(settings, event("failed")) == []
    env = json.loads(seen.read_text())
    assert "CANARY" not in json.dumps(env)
    assert not {"LDX_HOTFOLDER_HUB__API_KEY", "CREDENTIALS_DIRECTORY"} & set(env)
    assert (env["LC_ALL"], env["TZ"], env["LDX_ERROR_CODE"]) == (
        "C.UTF-8",
        "Asia/Tokyo",
        "invalid_input",
    )
    allowed = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME"}
    # the interpreter may add its own (LC_CTYPE coercion); nothing else of the daemon's
    extra = {k for k in env if not k.startswith(("LDX_", "LC_")) and k not in allowed}
    assert extra == set()


def test_webhook_credentials_are_never_shown(
    receiver: tuple[str, type[WebhookReceiver]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A webhook URL's user, password and query token stay out of hook_error and the log."""
    url, handler = receiver
    handler.answers[:] = [503]
    secret_url = url.replace("http://", "http://hookuser:CANARY-pw@") + "?token=CANARY-token"
    settings = HookSettings(webhook_url=secret_url, webhook_attempts=1)
    failures = run_hooks(settings, event("failed"))
    assert len(handler.bodies) == 1  # the credentials were used, only never shown
    captured = capsys.readouterr()
    message, logged = failures[0][1], captured.out + captured.err
    assert "hook failed" in logged
    assert "CANARY" not in message + logged
    assert "http://***@127.0.0.1:" in message
    assert "token=***" in message
