"""Completion hooks: tell other systems that a document is ready or a file failed.

A hook is a command (an argument list, never a shell) run with the job's facts in its
environment, and/or a webhook URL that receives a JSON POST. A command gets a minimal
environment: ``PATH``, ``HOME``, the locale and time zone, ``TMPDIR`` and the job's
``LDX_*`` variables; nothing else of the daemon's (never the API key, the credentials
directory or another ``LDX_HOTFOLDER_*`` setting). Hooks run in the background:
they never block the pipeline, and a failing or hanging hook never loses, repeats or
fails a conversion. A hung command is killed (with its process group) at its timeout; a
webhook is retried with backoff on network errors and 5xx. Every failure is logged and
reported to ``on_failure`` (which records it for ``status``), with the webhook's URL
shown without credentials or query values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from daemon.config import HookSettings
from daemon.logs import get_logger, plain, redact_url
from daemon.pipeline.faults import retry_delay

log = get_logger(component="hooks")
MAX_PARALLEL = 4
# What a command hook inherits from the daemon's environment; everything else stays out.
INHERITED = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME"})


def hook_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the daemon's ``environ`` a command hook may see."""
    return {
        name: value
        for name, value in environ.items()
        if name in INHERITED or (name.startswith("LC_") and name.isupper())
    }


@dataclass(frozen=True)
class HookEvent:
    """What a hook is told about one job's outcome."""

    job_id: int
    status: str  # "completed" or "failed"
    input_path: Path
    input_rel: str
    output_path: Path | None
    output_rel: str | None
    remote_job_id: str | None
    error_code: str | None
    error_message: str | None
    rule: str | None

    def environment(self) -> dict[str, str]:
        """The ``LDX_*`` variables a command hook receives."""
        values = {
            "LDX_JOB_ID": str(self.job_id),
            "LDX_STATUS": self.status,
            "LDX_INPUT": str(self.input_path),
            "LDX_INPUT_REL": self.input_rel,
            "LDX_OUTPUT": str(self.output_path or ""),
            "LDX_OUTPUT_REL": self.output_rel or "",
            "LDX_REMOTE_JOB_ID": self.remote_job_id or "",
            "LDX_ERROR_CODE": self.error_code or "",
            "LDX_ERROR_MESSAGE": self.error_message or "",
            "LDX_RULE": self.rule or "",
        }
        return {
            k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            for k, v in values.items()
        }

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON body."""
        return {
            "event": f"job.{self.status}",
            "job_id": self.job_id,
            "status": self.status,
            "path": self.input_rel,
            "output": self.output_rel,
            "remote_job_id": self.remote_job_id,
            "error": (
                {"code": self.error_code, "message": self.error_message}
                if self.status == "failed"
                else None
            ),
            "rule": self.rule,
        }


class Hooks:
    """Runs hooks in the background; ``drain`` waits for the ones still running."""

    def __init__(
        self,
        settings: HookSettings,
        on_failure: Callable[[int, str], None],
        *,
        base_env: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.on_failure = on_failure
        self.base_env = hook_environment(os.environ if base_env is None else base_env)
        self._transport = transport
        self._slots = asyncio.Semaphore(MAX_PARALLEL)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        """Whether any hook is configured."""
        s = self.settings
        return bool(s.on_completed or s.on_failed or s.webhook_url)

    def fire(self, event: HookEvent) -> None:
        """Start the hooks for ``event`` in the background and return at once."""
        command = (
            self.settings.on_completed if event.status == "completed" else (self.settings.on_failed)
        )
        if command:
            self._spawn(self._run_command(list(command), event))
        if self.settings.webhook_url:
            self._spawn(self._post(self.settings.webhook_url, event))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> None:
        """Give running hooks up to ``timeout`` seconds, then cancel them."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:  # let them kill their commands: no hook outlives the daemon
            await asyncio.wait(pending)

    async def _run_command(self, argv: list[str], event: HookEvent) -> None:
        async with self._slots:
            try:
                code = await run_command(
                    argv, {**self.base_env, **event.environment()}, self.settings.timeout
                )
            except OSError as exc:
                self._failed(event, f"hook {argv[0]!r} could not start: {exc.strerror}")
                return
            if code is None:
                self._failed(
                    event, f"hook {argv[0]!r} was killed after {self.settings.timeout:g} s"
                )
            elif code != 0:
                self._failed(event, f"hook {argv[0]!r} exited with status {code}")

    async def _post(self, url: str, event: HookEvent) -> None:
        attempts = self.settings.webhook_attempts
        async with httpx.AsyncClient(
            timeout=self.settings.timeout, transport=self._transport
        ) as client:
            for attempt in range(1, attempts + 1):
                problem = await _post_once(client, url, event.payload())
                if problem is None:
                    return
                if problem.startswith("HTTP 4"):
                    break  # the receiver refuses this request; sending it again won't help
                if attempt < attempts:
                    await asyncio.sleep(retry_delay(attempt, base=0.5, cap=60.0))
        shown = redact_url(url)
        self._failed(event, f"webhook {shown} failed after {attempt} attempt(s): {problem}")

    def _failed(self, event: HookEvent, message: str) -> None:
        message = plain(message, 1000)
        log.error("hook failed", job_id=event.job_id, path=event.input_rel, reason=message)
        self.on_failure(event.job_id, message)


async def _post_once(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str | None:
    try:
        response = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        return _plain(exc)  # in words, never the URL (it may hold credentials)
    if response.is_success:
        return None
    return f"HTTP {response.status_code}"


def _plain(exc: httpx.HTTPError) -> str:
    """A failed webhook request in words an office administrator follows."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return "the receiver cannot be reached (no connection: is it running, is the URL right?)"
    if isinstance(exc, httpx.TimeoutException):
        return "the receiver did not answer in time"
    if isinstance(exc, httpx.TransportError):
        return "the connection to the receiver broke off"
    return f"the request could not be sent ({type(exc).__name__})"


async def run_command(argv: list[str], env: dict[str, str], timeout: float) -> int | None:
    """Run ``argv``; return its exit status, or None when it was killed at ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so a timeout kills its children too
    )
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        return None
    finally:
        if proc.returncode is None:  # timed out, or cancelled because the daemon stops
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
