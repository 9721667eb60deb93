"""The RenderOCR routes: the engine list, creating jobs, listing them, and long polls.

``GET /renderocr/jobs/{job_id}?wait=N`` holds the answer until the job ends on the hub
clock (at most ``MAX_WAIT_SECONDS``), unless ``wait_mode`` ignores or rejects the
parameter. A create may be cut before or after its job exists (``drop_create_*``,
``lose_create_replies``).
"""

from __future__ import annotations

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from daemon.emulator import shapes
from daemon.emulator.gateway import Access
from daemon.emulator.handling import INLINE_BYTES, heavy, hub_call, json_body, newest, param
from daemon.emulator.hub import Hub
from daemon.emulator.middleware import DropConnection
from daemon.emulator.problems import Problems
from daemon.emulator.refusals import InvalidRequest
from daemon.emulator.streams import ServerHooks

MAX_WAIT_SECONDS = 10.0


def parse_wait(value: str | None) -> float:
    """Seconds a ``?wait=`` long poll may hold: 0 if absent, invalid or <= 0, else 1..10."""
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    if not seconds > 0:  # also NaN
        return 0.0
    return min(max(seconds, 1.0), MAX_WAIT_SECONDS)


class JobRoutes:
    """Handlers of /renderocr over one hub."""

    def __init__(self, hub: Hub, hooks: ServerHooks, problems: Problems) -> None:
        self.hub = hub
        self.hooks = hooks
        self.problems = problems

    async def engines(self, request: Request) -> Response:
        """``GET /renderocr/engines``: public, unless ``engines_shape`` asks for a key."""
        shape = self.hub.knobs.variants.engines_shape
        if shape == "auth_required":
            access = self.hub.check_key(request.headers.get("authorization"))
            if access is not Access.GRANTED:
                return self.problems.unauthorized(request, access)
        return JSONResponse(shapes.engines_body(self.hub.engines(), shape))

    async def create_job(self, request: Request) -> Response:
        """``POST /renderocr/jobs``: queue a job (202, ``create_status``), or cut the connection."""
        body = await json_body(request)
        if self.hub.take_create_drop(body):
            raise DropConnection  # before any job exists
        file_id = body.get("file_id") if isinstance(body, dict) else None
        # Creating a job reads the input to sniff it: a big one goes to a worker thread.
        big = isinstance(file_id, str) and self.hub.file_size(file_id) > INLINE_BYTES
        if big or heavy(self.hub):
            job = await run_in_threadpool(self.hub.create_job, body)
        else:
            job = self.hub.create_job(body)
        if self.hub.take_lost_reply(job.job_id):
            raise DropConnection  # the job exists; its reply never arrives
        variants = self.hub.knobs.variants
        answer = shapes.job_body(job, variants)
        return shapes.json_response(answer, variants.create_status, variants)

    async def list_jobs(self, request: Request) -> Response:
        """``GET /renderocr/jobs``: every live job, newest first (cut to ``list_limit``)."""
        jobs = await hub_call(self.hub, self.hub.list_jobs)
        variants = self.hub.knobs.variants
        shape = shapes.job_shaper(variants)
        listed = [shape(job) for job in newest(jobs, variants)]
        return shapes.json_response({"data": listed}, 200, variants)

    async def get_job(self, request: Request) -> Response:
        """``GET /renderocr/jobs/{job_id}``: the job, after a long poll if ``?wait=`` asks."""
        job_id = param(request, "job_id")
        variants = self.hub.knobs.variants
        asked = request.query_params.get("wait")
        if asked is not None and variants.wait_mode == "reject":
            # As a strict backend refuses a query parameter it does not know.
            raise InvalidRequest("invalid_parameter", "Unknown query parameter 'wait'.")
        wait = parse_wait(asked) if variants.wait_mode == "honour" else 0.0
        if wait > 0:
            await self._wait_for_end(job_id, wait)
        job = await hub_call(self.hub, self.hub.get_job, job_id)
        return shapes.json_response(shapes.job_body(job, variants), 200, variants)

    async def _wait_for_end(self, job_id: str, wait: float) -> None:
        """Sleep until the job's end on the hub clock, the wait's end, or server stop.

        The end time is fixed at creation, so the poll sleeps until then (answering as
        the job ends, not up to a polling step later); a clock advance or the server's
        stop nudges it awake to look again.
        """
        ends_at = self.hub.job_terminal_at(job_id)
        if ends_at is None:
            return
        deadline = anyio.current_time() + wait
        while not self.hooks.stopping:
            until_end = (ends_at - self.hub.clock.now()).total_seconds()
            remaining = deadline - anyio.current_time()
            if until_end <= 0 or remaining <= 0:
                return
            await self.hooks.doze(min(until_end, remaining))
