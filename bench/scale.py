"""Scale-out benchmark: one instance against three, sharing one PostgreSQL database.

Usage: python -m bench.scale [--files 300] [--processing 1.0] [--max-in-flight 4]

Starts a PostgreSQL server of its own (tests/postgres.py: initdb and pg_ctl in a
temporary folder, as ``nobody`` when run as root), the emulator at a fixed processing
time, and ``ldx-hotfolder run`` as real subprocesses on one inbox, each limited by
``max_in_flight``. Once every instance is ready, the files are dropped at once; the time
until the last one is completed is measured for one instance and for three, and the
speed-up printed (target: at least 2.5). The helpers here also drive the scale-out
tests (tests/system/test_scale_out.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select

from bench.harness import Folders, write_config
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.jobs.tables import jobs_table
from tests import postgres
from tests.helpers import Daemon, wait_for
from tests.scans import drop_scans


@dataclass
class Cluster:
    """Several daemons on one inbox, outbox and state database."""

    root: Path
    db_url: str
    hub_url: str
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def inbox(self) -> Path:
        """The shared inbox."""
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        """The shared outbox."""
        return self.root / "outbox"

    def config(self, name: str, **settings: Any) -> Path:
        """Write the configuration of instance ``name``; each keeps its own heartbeat."""
        local = Folders(self.root / name)
        local.root.mkdir(parents=True, exist_ok=True)
        return write_config(
            local,
            self.hub_url,
            {"poll_interval": 1.0},
            inbox=str(self.inbox),
            outbox=str(self.outbox),
            state_db=self.db_url,
            instance_id=name,
            health_socket=str(local.root / "health.sock"),
            quiet_period=0.2,
            **settings,
        )

    def start(self, names: list[str], **settings: Any) -> list[Daemon]:
        """Start one ``ldx-hotfolder run`` per name; wait until each is ready."""
        for folder in (self.inbox, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)
        started = [
            Daemon(self.config(name, **settings), self.root / name / "daemon.log").start()
            for name in names
        ]
        for daemon in started:
            wait_ready(daemon)
        self.daemons += started
        return started

    def rows(self) -> list[dict[str, Any]]:
        """Every row of the jobs table."""
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                query = select(jobs_table).order_by(jobs_table.c.id)
                return [dict(row._mapping) for row in conn.execute(query)]
        finally:
            engine.dispose()

    def completed(self) -> int:
        """How many jobs are completed."""
        return sum(row["status"] == "completed" for row in self.rows())

    def stop(self) -> list[int]:
        """SIGTERM every daemon still running; their exit codes."""
        return [d.stop() for d in self.daemons if d.proc is not None and d.proc.poll() is None]


def wait_ready(daemon: Daemon, timeout: float = 60.0) -> None:
    """Wait until the daemon finished its start-up scan."""
    deadline = time.monotonic() + timeout
    while "start-up scan done" not in daemon.log():
        assert daemon.proc is not None
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the daemon did not start: {daemon.log()[-3000:]}")
        time.sleep(0.05)


def timed_run(
    root: Path, db_url: str, hub_url: str, *, instances: int, files: int, max_in_flight: int
) -> float:
    """Seconds from dropping ``files`` scans to the last completed, with ``instances``."""
    cluster = Cluster(root, db_url, hub_url)
    names = [f"node-{n + 1}" for n in range(instances)]
    try:
        cluster.start(names, max_in_flight=max_in_flight)
        began = time.monotonic()
        drop_scans(cluster.inbox, files, seed=instances, folders=4)
        wait_for(lambda: cluster.completed() >= files, 600, f"{files} completed jobs", 0.1)
        return time.monotonic() - began
    finally:
        cluster.stop()


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--processing", type=float, default=1.0, help="seconds per hub job")
    parser.add_argument("--max-in-flight", type=int, default=4)
    args = parser.parse_args()
    server = postgres.start()
    seconds: dict[int, float] = {}
    try:
        settings = EmulatorSettings(processing_time=args.processing, seed=1)
        with EmulatorServer(settings) as hub, tempfile.TemporaryDirectory() as tmp:
            for count in (1, 3):
                url = server.new_database(f"scale_{count}")
                root = Path(tmp) / f"run-{count}"
                seconds[count] = timed_run(
                    root,
                    url,
                    hub.url,
                    instances=count,
                    files=args.files,
                    max_in_flight=args.max_in_flight,
                )
                rate = args.files / seconds[count]
                print(f"{count} instance(s): {seconds[count]:.1f} s ({rate:.1f} files/s)")
    finally:
        server.stop()
    speedup = seconds[1] / seconds[3]
    print(
        f"{args.files} files, processing {args.processing:g} s, max_in_flight "
        f"{args.max_in_flight} per instance: speed-up of 3 instances {speedup:.2f} "
        f"(target >= 2.5)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
