"""Paths over the system's limits fail alone, with a reason; intake goes on (#35, Major 4)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from daemon import fs
from daemon.inbox.enqueue import path_too_long
from daemon.inbox.stability import Patience
from tests.inbox.inprocess import Clock, intake_of, table
from tests.scans import make_scan


def deep_file(root: Path, depth: int, data: bytes, name: str = "scan.png") -> str:
    """Write ``root/d.../name`` ``depth`` folders of 200 bytes deep, through descriptors
    (the whole path is longer than the kernel takes); return its relative path."""
    part = "d" * 200
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=fd)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)
    return "/".join([part] * depth + [name])


def test_path_too_long_names_the_limit() -> None:
    """An output path of 4096 bytes or more, or a name over 255, is too long (pure)."""
    assert path_too_long(Path("/o"), "a/scan.pdf", "docx") is None
    deep = "/".join(["d" * 200] * 21) + "/scan.pdf"
    why = path_too_long(Path("/o"), deep, "docx")
    assert why is not None
    assert "more than the system's limit of 4095" in why
    assert fs.too_long("/o/" + "n" * 256) is not None


def test_an_input_whose_output_path_is_too_long_fails_alone(folders: dict[str, Path]) -> None:
    """The deep input fails with path_too_long; a normal one is queued; intake goes on."""
    clock = Clock()
    deep = deep_file(folders["inbox"], 21, make_scan("png", 1))
    (folders["inbox"] / "fine.png").write_bytes(make_scan("png", 2))

    async def scenario() -> None:
        async with intake_of(folders, clock, Patience(quiet_period=1.0)) as intake:
            await intake.scan()
            clock.advance(1.1)
            await intake.tick()
            assert not intake.pending()

    asyncio.run(scenario())
    rows = {row["path"]: row for row in table(folders)}
    assert rows["fine.png"]["stage"] == "pending"
    assert (rows[deep]["status"], rows[deep]["error_code"]) == ("failed", "path_too_long")
    assert "too long for the system" in rows[deep]["error_message"]


def test_an_input_path_over_the_limit_is_taken_when_its_output_fits(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """An input deeper than PATH_MAX is read through descriptors, not skipped."""
    clock = Clock()
    inbox = tmp_path / ("i" * 250) / ("j" * 250)  # the inbox path is 500 bytes longer
    inbox.mkdir(parents=True)
    deep = deep_file(inbox, 18, make_scan("png", 3))
    assert fs.path_bytes(inbox / deep) > fs.PATH_MAX
    assert fs.path_bytes(folders["outbox"] / deep) < fs.PATH_MAX - 20

    async def scenario() -> None:
        async with intake_of({**folders, "inbox": inbox}, clock, Patience(1.0)) as intake:
            await intake.scan()
            clock.advance(1.1)
            await intake.tick()

    asyncio.run(scenario())
    assert [(row["path"], row["stage"]) for row in table(folders)] == [(deep, "pending")]
