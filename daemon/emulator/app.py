"""The LDX hub emulator's HTTP face: a Starlette app over a ``Hub``.

API routes (fact sheet §4-§7); all but the engine list need ``Authorization: Bearer <key>``:

    GET  /files                    {"data": [FileInfo]}, newest first
    POST /files                    multipart/form-data, part "file" -> 201 FileInfo
    GET  /files/{file_id}          FileInfo
    GET  /files/{file_id}/content  the bytes; Range -> 206, If-Unmodified-Since -> 412
    POST /uploads                  {"filename": ...} -> 201 FileInfo of an empty file
    PUT  /uploads/{file_id}        {"data": base64, <= 5 MB decoded} -> FileInfo, appended
    GET  /renderocr/engines        public engine list
    POST /renderocr/jobs           {file_id, engine, languages, output_format} -> 202 job
    GET  /renderocr/jobs           {"data": [job]}, newest first, no paging
    GET  /renderocr/jobs/{job_id}  the job; ?wait=N holds it up to N s (1-10) until terminal
    GET  /_storage/{token}         a redirected download's bytes (download_redirect); no
                                   key needed, as a pre-signed storage URL; 403 when unknown

Admin routes: no auth, never faulted, not counted in the ledger:

    GET  /_emulator/ledger        {"requests": {"METHOD /route": n}, "refused": {"METHOD
                                  /route": 429s}, "uploads": [{file_id, filename, size,
                                  sha256, content_type, received_at}], "jobs": [{job_id,
                                  file_id, engine, languages, output_format, created_at,
                                  finishes_at, filename, input_pages, outcome, reply_lost}],
                                  "downloads": [{file_id, size, status[, mode]}], "events":
                                  [...], "faults": {kind: n}, "storage_saw_authorization": n}
    GET  /_emulator/faults        every knob
    POST /_emulator/faults        partial update of any knobs -> every knob; 400 names a
                                  bad knob or value
    POST /_emulator/clock         {"advance": seconds} -> {"now": ..., "offset": seconds}
    POST /_emulator/keys          {"api_keys": [...], "revoked": [...]} -> both lists
    POST /_emulator/reset-ledger  -> the emptied ledger

Every job created is one paid conversion: ``hub.pages_billed(ledger)`` and
``hub.paid_conversions(ledger)`` add them up; ``hub.refused_share(ledger)`` is the share
of requests answered 429.

Knobs (``daemon/emulator/knobs.py``; JSON key = name, CLI flag = --name-with-dashes):

  Request faults (Faults)
    error_rate, rate_limit_rate, drop_rate  fractions answered 5xx / 429 / cut (one draw)
    retry_after                seconds of injected 429s
    job_failure_rate           fraction of jobs failing with upstream_service_error
    latency                    seconds added to authenticated routes
    stall_downloads            count: downloads that send half, then stall
    files_rate_limit           per-key requests/minute on /files (0 = off)
    requests_per_minute        per-key requests/minute on every authenticated route
    retry_after_format         seconds | http_date | absent, for every 429
    lose_create_replies        count: creates that make the job, then cut the connection
    drop_create_requests       count: creates cut before any job is made
    drop_create_after_failure  after a job fails, cut that many creates for its filename
    outage                     false | true (until cleared) | seconds from now
    outage_mode                drop | 503 | html502
    outage_spares_engines      the public engine list stays up in an outage
    refuse_route, refuse_status  one route ("POST /renderocr/jobs") answered 402 or 403
  Outputs and downloads (Storage)
    output_delay               seconds an output answers 404 after its job completed
    output_missing             outputs always answer 404
    output_ttl, job_ttl        seconds outputs / jobs live after completion (null = build)
    expired_status             404 | 410 for expired files and jobs
    download_mode              normal | endless | trickle | oversize | unsized
    trickle_interval, oversize_bytes  pace of trickle; extra bytes of oversize/unsized
    download_gzip              gzip Content-Encoding with the compressed Content-Length
    download_gzip_bomb, gzip_bomb_bytes  gzip body inflating to N bytes (1 GiB)
    download_redirect, storage_host  302 to /_storage/<token> on another host name
    output_bomb                none | deep_xml | zeros, for jobs completing from now on
    bomb_depth, bomb_bytes     10,000,000 nested elements; 4 GiB of zeros
  Answer shapes (Variants)
    create_status, upload_status  200 | 201 | 202 (defaults 202 and 201)
    extra_fields               unknown fields in job and file bodies
    progress_scale             fraction | percent_int | percent_float
    timestamp_style            z | fraction_z | offset
    timestamp_skew             seconds added to every reported time and HTTP date
    omit_fields                some of completed_at, expires_at, usage
    status_case                lower | upper
    extra_status               a status (e.g. running) reported instead of processing
    error_as_string            a failed job's error as "code: message"
    usage_on_failure           failed jobs report usage too
    engines_shape              objects | strings | other_wrapper | no_languages |
                               no_conversions | empty | auth_required
    error_body                 default | problem | nested | message | text | html
    missing_input_status, missing_input_code  400 invalid_file_id by default
    list_limit                 lists hold only the newest N
    wait_mode                  honour | ignore | reject
    echo_auth                  error bodies repeat the Authorization header
    hostile_ids                ids like "../../x%2F..." (send them percent-encoded)
    json_padding, gzip_json    pad job/list answers with N spaces; gzip them

Error bodies follow who would answer in the real stack: the gateway (auth, rate limits,
injected faults, outages, refused routes, size limits, unknown routes) sends Zuplo's
problem+json; the backend (validation, unknown ids) sends ``{"code", "message",
"request_id"}`` unless ``error_body`` says otherwise. The real codes of the backend
errors are unknown.

The app is assembled here from its parts: ``admission`` (the gateway's policies in front
of every API route), ``problems`` (error answers), the route handlers by resource
(``file_routes``, ``download_routes``, ``job_routes``, ``admin_routes``) and
``middleware`` (hostile ids, cut connections).
"""

from __future__ import annotations

from typing import cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from daemon.emulator.admin_routes import AdminRoutes
from daemon.emulator.admission import Admission
from daemon.emulator.download_routes import (
    STALL_EVENT,
    STORAGE_ROUTE,
    TRICKLE_LENGTH,
    DownloadRoutes,
    RangeNotSatisfiable,
    parse_range,
)
from daemon.emulator.file_routes import FileRoutes
from daemon.emulator.handling import TRACE_HEADER
from daemon.emulator.hub import Hub
from daemon.emulator.job_routes import MAX_WAIT_SECONDS, JobRoutes, parse_wait
from daemon.emulator.middleware import GatewayMiddleware
from daemon.emulator.problems import Problems
from daemon.emulator.refusals import HubError
from daemon.emulator.streams import ServerHooks

__all__ = [
    "MAX_WAIT_SECONDS",
    "STALL_EVENT",
    "STORAGE_ROUTE",
    "TRACE_HEADER",
    "TRICKLE_LENGTH",
    "RangeNotSatisfiable",
    "ServerHooks",
    "create_app",
    "hooks_of",
    "parse_range",
    "parse_wait",
]


def create_app(hub: Hub) -> Starlette:
    """Build the emulator's ASGI app over ``hub``."""
    hooks = ServerHooks()
    hub.clock.subscribe(hooks.nudge)
    problems = Problems(hub)
    app = Starlette(
        routes=_routes(hub, hooks, problems),
        middleware=[Middleware(GatewayMiddleware, hooks=hooks)],
        exception_handlers={
            HubError: problems.on_hub_error,
            HTTPException: problems.on_http_error,
        },
    )
    app.state.hooks = hooks
    return app


def hooks_of(app: Starlette) -> ServerHooks:
    """Return the hooks of an app made by ``create_app``."""
    return cast(ServerHooks, app.state.hooks)


def _routes(hub: Hub, hooks: ServerHooks, problems: Problems) -> list[Route]:
    """Every route, as the docstring lists them: API routes behind admission, then admin."""
    gate = Admission(hub, problems)
    files = FileRoutes(hub)
    downloads = DownloadRoutes(hub, hooks, problems)
    jobs = JobRoutes(hub, hooks, problems)
    admin = AdminRoutes(hub)
    return [
        gate.api("GET", "/files", files.list_files),
        gate.api("POST", "/files", files.upload_file),
        gate.api("GET", "/files/{file_id}", files.get_file),
        gate.api("GET", "/files/{file_id}/content", downloads.download),
        gate.api("POST", "/uploads", files.create_upload),
        gate.api("PUT", "/uploads/{file_id}", files.append_upload),
        gate.public("GET", "/renderocr/engines", jobs.engines),
        gate.api("POST", "/renderocr/jobs", jobs.create_job),
        gate.api("GET", "/renderocr/jobs", jobs.list_jobs),
        gate.api("GET", "/renderocr/jobs/{job_id}", jobs.get_job),
        Route("/_storage/{token}", downloads.storage, methods=["GET"]),
        Route("/_emulator/ledger", admin.ledger, methods=["GET"]),
        Route("/_emulator/faults", admin.faults, methods=["GET", "POST"]),
        Route("/_emulator/clock", admin.clock, methods=["POST"]),
        Route("/_emulator/keys", admin.keys, methods=["POST"]),
        Route("/_emulator/reset-ledger", admin.reset_ledger, methods=["POST"]),
    ]
