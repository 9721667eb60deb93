"""Command line of the LDX hub emulator (``ldx-hotfolder emulator``).

``configure_parser`` adds the emulator's options to a (sub)parser: the server and job
options, then one ``--knob-name`` option per runtime knob (``knobs.py``; the same names
as ``POST /_emulator/faults`` takes, grouped as request faults, outputs and downloads,
answer shapes). ``run`` builds the hub from them and serves it until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from daemon.emulator import knobs
from daemon.emulator.hub import DEFAULT_API_KEY, Hub, HubSettings, Knobs
from daemon.emulator.server import serve


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return value


def _processing_time(text: str) -> float | tuple[float, float]:
    """``"3"`` for a fixed time, ``"3-8"`` for a range drawn per job."""
    low, dash, high = text.partition("-")
    if not dash:
        return _non_negative(text)
    bounds = (_non_negative(low), _non_negative(high))
    if bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"the minimum exceeds the maximum: {text!r}")
    return bounds


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options to ``parser``."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    add("--port", type=int, default=8787, help="port to listen on; 0 picks one (default: 8787)")
    add(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        help=f"accepted API key; repeat for several (default: {DEFAULT_API_KEY})",
    )
    add(
        "--processing-time",
        type=_processing_time,
        default=3.0,
        metavar="SECONDS|MIN-MAX",
        help="seconds a job processes, fixed or drawn per job from a range (default: 3)",
    )
    add("--queue-delay", type=_non_negative, default=0.0, help="seconds a job stays queued")
    add("--error-rate", type=_fraction, default=0.0, help="fraction of requests answered 5xx")
    add("--rate-limit-rate", type=_fraction, default=0.0, help="fraction answered 429")
    add("--retry-after", type=_non_negative, default=1.0, help="Retry-After seconds of a 429")
    add("--drop-rate", type=_fraction, default=0.0, help="fraction of connections cut")
    add("--job-failure-rate", type=_fraction, default=0.0, help="fraction of jobs that fail")
    add("--latency", type=_non_negative, default=0.0, help="seconds added to every response")
    add(
        "--files-rate-limit",
        type=int,
        default=0,
        metavar="PER_MINUTE",
        help="requests per minute per key on /files; 0 = off (the real hub allows ~100)",
    )
    add(
        "--output-size",
        type=int,
        default=0,
        metavar="BYTES",
        help="pad every output to at least this many bytes, for benchmarks of big "
        "downloads (a stored part of zeros; default: 0, no padding)",
    )
    add("--seed", type=int, help="seed of the fault and timing draws, for reproducible runs")
    add(
        "--data-dir",
        type=Path,
        help="where stored files go (default: a temporary directory removed on exit)",
    )
    knobs.add_options(parser, skip=_HAND_MADE)


# Knobs whose options above predate the generated ones (and keep their own defaults).
_HAND_MADE = frozenset(
    {
        "error_rate",
        "rate_limit_rate",
        "retry_after",
        "drop_rate",
        "job_failure_rate",
        "latency",
        "files_rate_limit",
    }
)


def _settings(args: argparse.Namespace) -> HubSettings:
    hand_made = {name: getattr(args, name) for name in _HAND_MADE}
    chosen = Knobs().updated({**hand_made, **knobs.changes_from(args)})
    return HubSettings(
        api_keys=tuple(args.api_keys or [DEFAULT_API_KEY]),
        processing_time=args.processing_time,
        queue_delay=args.queue_delay,
        output_size=args.output_size,
        seed=args.seed,
        faults=chosen.faults,
        storage=chosen.storage,
        variants=chosen.variants,
    )


def run(args: argparse.Namespace) -> int:
    """Serve the emulator until Ctrl-C; return the process exit status."""
    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = ", ".join(settings.api_keys)

    def announce(url: str) -> None:
        print(f"LDX hub emulator on {url} (API key: {keys})", flush=True)

    with contextlib.ExitStack() as stack:
        data_dir = args.data_dir
        if data_dir is None:
            temporary = tempfile.TemporaryDirectory(prefix="ldx-emulator-")
            data_dir = Path(stack.enter_context(temporary))
        try:
            serve(Hub(data_dir, settings), args.host, args.port, on_ready=announce)
        except OSError as exc:
            print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled
            pass
    return 0
