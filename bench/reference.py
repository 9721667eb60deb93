"""Reference client: the same HTTP calls as the daemon, with no state and no watching.

Usage: python -m bench.reference --url URL --inbox DIR --outbox DIR [--concurrency 32]
       [--poll long|naive]

For every file under the inbox, at most ``concurrency`` at once: ``POST /files``,
``POST /renderocr/jobs``, poll ``GET /renderocr/jobs/{id}`` (``long``: ``?wait=10``, as the
daemon does; ``naive``: a plain GET every second), then stream ``GET /files/{id}/content``
into the outbox, over plain httpx (one ``AsyncClient`` and its pool). No database, no
retries, no checks: the floor the daemon is measured against. Prints one JSON line: files,
seconds, files_per_s, and cpu: the CPU seconds of the run itself, from the listing of the
inbox to the last output, without the interpreter's start and imports (the daemon's CPU
is counted from READY=1 on, after its own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

from daemon.emulator.hub import DEFAULT_API_KEY

MIME = {".pdf": "application/pdf", ".tif": "image/tiff", ".jpg": "image/jpeg"}
MIME |= {".png": "image/png", ".bmp": "image/bmp"}


async def convert(client: httpx.AsyncClient, path: Path, target: Path, naive: bool) -> None:
    """Upload, create, poll, download one file."""
    with path.open("rb") as stream:
        files = {"file": (path.name, stream, MIME.get(path.suffix, "application/pdf"))}
        uploaded = (await client.post("/files", files=files)).raise_for_status().json()
    payload = {"file_id": uploaded["file_id"], "engine": "ki/ocr"}
    payload |= {"languages": ["jpn"], "output_format": "docx"}
    job = (await client.post("/renderocr/jobs", json=payload)).raise_for_status().json()
    while job["status"] not in ("completed", "failed"):
        if naive:
            await asyncio.sleep(1.0)
        params = None if naive else {"wait": 10}
        response = await client.get(f"/renderocr/jobs/{job['job_id']}", params=params)
        job = response.raise_for_status().json()
    if job["status"] != "completed":
        raise RuntimeError(f"{path}: {job.get('error')}")
    target.parent.mkdir(parents=True, exist_ok=True)
    async with client.stream("GET", f"/files/{job['output_file_id']}/content") as response:
        response.raise_for_status()
        with target.open("wb") as out:
            async for chunk in response.aiter_bytes(256 * 1024):
                out.write(chunk)


async def run(url: str, inbox: Path, outbox: Path, concurrency: int, naive: bool) -> int:
    """Convert every file under ``inbox``; return how many."""
    paths = sorted(Path(d) / n for d, _, names in os.walk(inbox) for n in names)
    limits = httpx.Limits(
        max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8
    )
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            path = queue.get_nowait()
            target = (outbox / path.relative_to(inbox)).with_suffix(".docx")
            await convert(client, path, target, naive)

    # The daemon's own HTTP stack (an httpx.AsyncClient with its pool), so that the
    # comparison measures what the daemon adds, not a difference of HTTP libraries.
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=120, limits=limits
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return len(paths)


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--inbox", type=Path, required=True)
    parser.add_argument("--outbox", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--poll", choices=("long", "naive"), default="long")
    args = parser.parse_args()
    started, cpu0 = time.monotonic(), time.process_time()
    files = asyncio.run(
        run(args.url, args.inbox, args.outbox, args.concurrency, args.poll == "naive")
    )
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu0
    print(
        json.dumps({"files": files, "seconds": seconds, "files_per_s": files / seconds, "cpu": cpu})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
