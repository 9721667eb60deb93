"""One job per path at a time: a newer version supersedes or waits (#35, minor).

A file rewritten just slower than the quiet period used to get a job (and, when it
failed, an error file and a hook call) per version. Now a newer version replaces the
earlier version's job when nothing was paid for it, and otherwise waits until it ends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.inbox.stability import Patience
from daemon.jobs.model import Stage
from tests.inbox.inprocess import Clock, intake_of, table
from tests.scans import make_scan

PATIENCE = Patience(quiet_period=1.0)


def test_a_newer_version_replaces_a_job_nothing_was_paid_for(folders: dict[str, Path]) -> None:
    """The queued, unclaimed job of version 1 is withdrawn; version 2 is queued instead."""
    clock = Clock()
    scan = folders["inbox"] / "a.png"

    async def scenario() -> None:
        async with intake_of(folders, clock, PATIENCE) as intake:
            scan.write_bytes(make_scan("png", 1))
            await intake.scan()
            clock.advance(1.1)
            await intake.tick()
            scan.write_bytes(make_scan("png", 2))  # longer or shorter: another version
            intake.hint(str(scan), is_dir=False)
            clock.advance(1.1)
            await intake.tick()

    asyncio.run(scenario())
    rows = table(folders)
    assert [(r["size"], r["stage"]) for r in rows] == [(scan.stat().st_size, "pending")]
    assert not any(r["status"] == "failed" for r in rows)


def test_a_newer_version_waits_for_the_job_being_worked_on(folders: dict[str, Path]) -> None:
    """While an instance holds version 1's job, version 2 waits; it is queued once v1 ends."""
    clock = Clock()
    scan = folders["inbox"] / "a.png"

    async def scenario() -> None:
        async with intake_of(folders, clock, PATIENCE) as intake:
            store = intake.db.store
            scan.write_bytes(make_scan("png", 1))
            await intake.scan()
            clock.advance(1.1)
            await intake.tick()
            # A worker holds the job (nothing paid yet): it finds the change itself.
            (claim,) = await intake.db.call(store.claim, clock(), 1, [], "worker", 600.0)
            scan.write_bytes(make_scan("png", 2))
            intake.hint(str(scan), is_dir=False)
            clock.advance(1.1)
            await intake.tick()
            assert list(intake.behind) == ["a.png"]
            assert intake.pending()  # ``once`` goes on while a version waits
            assert len(table(folders)) == 1
            await intake.db.call(store.advance, claim.job.id, Stage.DONE, clock())
            clock.advance(1.1)
            await intake.tick()  # the earlier job ended: taken up again
            clock.advance(1.1)
            await intake.tick()
            assert not intake.pending()

    asyncio.run(scenario())
    rows = table(folders)
    assert [r["stage"] for r in rows] == ["done", "pending"]
    assert rows[1]["size"] == scan.stat().st_size


def test_a_paid_job_is_never_withdrawn_even_when_nobody_holds_it(
    folders: dict[str, Path],
) -> None:
    """A job a conversion was paid for (submits > 0) is not withdrawn: the new one waits."""
    clock = Clock()
    scan = folders["inbox"] / "a.png"

    async def scenario() -> None:
        async with intake_of(folders, clock, PATIENCE) as intake:
            store = intake.db.store
            scan.write_bytes(make_scan("png", 1))
            await intake.scan()
            clock.advance(1.1)
            await intake.tick()
            (job,) = (await intake.db.call(store.unfinished_of, ["a.png"])).values()
            await intake.db.call(store.advance, job.id, Stage.UPLOADED, clock(), submits=1)
            scan.write_bytes(make_scan("png", 2))
            intake.hint(str(scan), is_dir=False)
            clock.advance(1.1)
            await intake.tick()
            assert list(intake.behind) == ["a.png"]

    asyncio.run(scenario())
    assert [r["stage"] for r in table(folders)] == ["uploaded"]
