"""Random interleavings of inbox changes, hub faults and SIGKILLs keep the guarantees.

Hypothesis drives a real inbox, the emulator on loopback and the daemon as a real
subprocess: files are dropped, rewritten, renamed and deleted, the hub starts and stops
failing, and the daemon is killed at a random moment of a run. After every step no
output under a final name is incomplete; at the end one ``once`` run with a healthy hub
settles everything, and then every input in the inbox has its conversion in the outbox,
byte-identical to the hub's, nothing half-written was ever uploaded, the hub ran at most
one job per version of an input plus one per kill, and the table passes its integrity
check. Examples are derandomized so that CI runs the same ones every time.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from daemon.config import load_settings
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.outbox.layout import TEMP_MARKER, error_file_for
from daemon.outbox.verify import verify_package
from daemon.service import run_service
from tests.conftest import daemon_config
from tests.faults import integrity, job_rows, outbox_files
from tests.helpers import Daemon, wait_for
from tests.scans import EXTENSIONS, make_scan

FOLDERS = ("", "a", "a/b")
STEMS = ("s0", "s1", "s2")  # few stems, so that scan.pdf and scan.png meet in one folder
KINDS = ("pdf", "png", "jpeg", "tiff", "bmp")
FAULT_LEVELS = (0.0, 0.2, 0.5)  # share of requests the hub answers 5xx, 429 or cuts


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HotFolder(RuleBasedStateMachine):
    """An inbox, a hub and a daemon that dies now and then."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="ldx-machine-"))
        folders = {name: self.root / name for name in ("inbox", "outbox", "state")}
        for folder in folders.values():
            folder.mkdir()
        self.inbox, self.outbox = folders["inbox"], folders["outbox"]
        self.db = folders["state"] / "state.db"
        self.server = EmulatorServer(EmulatorSettings(processing_time=(0.0, 0.4), seed=5))
        self.server.__enter__()
        self.config = daemon_config(self.root, folders, self.server.url, quiet_period=0.2)
        self.files: dict[str, bytes] = {}  # what the inbox holds now
        self.written: set[str] = set()  # digests of every complete content written
        self.versions = 0  # (path, content) pairs that ever stood in the inbox
        self.kills = 0
        self.seed = 0

    def _write(self, rel: str, data: bytes) -> None:
        path = self.inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[rel] = data
        self.written.add(_digest(data))
        self.versions += 1

    def _fresh_scan(self, kind: str) -> bytes:
        self.seed += 1
        return make_scan(kind, self.seed)

    @initialize(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4))
    def first_scans(self, kinds: list[str]) -> None:
        """A few scans are waiting before the daemon first starts."""
        for number, kind in enumerate(kinds):
            self._write(
                f"{FOLDERS[number % 3]}/first{number}{EXTENSIONS[kind]}".lstrip("/"),
                self._fresh_scan(kind),
            )

    @rule(folder=st.sampled_from(FOLDERS), stem=st.sampled_from(STEMS), kind=st.sampled_from(KINDS))
    def drop(self, folder: str, stem: str, kind: str) -> None:
        """A scanner drops a new file (or a new version under a name already there)."""
        rel = f"{folder}/{stem}{EXTENSIONS[kind]}".lstrip("/")
        self._write(rel, self._fresh_scan(kind))

    @precondition(lambda self: bool(self.files))
    @rule(data=st.data())
    def copy(self, data: st.DataObject) -> None:
        """Someone copies a file that is already there under another name (same content)."""
        source = data.draw(st.sampled_from(sorted(self.files)))
        folder = data.draw(st.sampled_from(FOLDERS))
        rel = f"{folder}/copy-{self.seed}{Path(source).suffix}".lstrip("/")
        self.seed += 1
        self._write(rel, self.files[source])

    @precondition(lambda self: bool(self.files))
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        """Someone moves a file to another folder under a new name."""
        source = data.draw(st.sampled_from(sorted(self.files)))
        folder = data.draw(st.sampled_from(FOLDERS))
        rel = f"{folder}/moved-{self.seed}{Path(source).suffix}".lstrip("/")
        self.seed += 1
        (self.inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.inbox / source).rename(self.inbox / rel)
        self.files[rel] = self.files.pop(source)
        self.versions += 1

    @precondition(lambda self: bool(self.files))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """Someone deletes a file, converted or not."""
        rel = data.draw(st.sampled_from(sorted(self.files)))
        (self.inbox / rel).unlink()
        del self.files[rel]

    @rule(level=st.sampled_from(FAULT_LEVELS))
    def hub_faults(self, level: float) -> None:
        """The hub starts (or stops) failing a share of requests."""
        self.server.hub.update_faults(
            {
                "error_rate": level / 2,
                "rate_limit_rate": level / 4,
                "retry_after": 0.5,
                "drop_rate": level / 4,
            }
        )

    @rule(moment=st.floats(min_value=0.0, max_value=1.5))
    def run_and_kill(self, moment: float) -> None:
        """The daemon runs, then dies by SIGKILL at a random moment of its work."""
        daemon = Daemon(self.config, self.root / f"daemon-{self.kills}.log").start()
        try:
            wait_for(lambda: "start-up scan done" in daemon.log(), 30, "the start-up scan")
            time.sleep(moment)  # not a synchronisation: the moment of the crash
        finally:
            daemon.kill()
        self.kills += 1

    @rule()
    def run_to_the_end(self) -> None:
        """The daemon runs once over everything with a healthy hub, and stops by itself."""
        self._clear_faults()
        outcome = asyncio.run(run_service(load_settings(self.config), once=True))
        assert outcome is not None
        assert outcome.exit_code == 0, outcome

    def _clear_faults(self) -> None:
        self.server.hub.update_faults({"error_rate": 0.0, "rate_limit_rate": 0.0, "drop_rate": 0.0})

    @invariant()
    def no_incomplete_output(self) -> None:
        """Whatever happened, every output under a final name is a complete document."""
        for rel in outbox_files(self.outbox):
            if TEMP_MARKER not in rel and rel.endswith(".docx"):
                verify_package(self.outbox / rel, "docx")

    def teardown(self) -> None:
        try:
            self._settle_and_check()
        finally:
            self.server.__exit__(None, None, None)
            shutil.rmtree(self.root, ignore_errors=True)

    def _settle_and_check(self) -> None:
        self.run_to_the_end()
        rows = job_rows(self.db)
        # Coverage, shown by --hypothesis-show-statistics.
        event(f"kills: {min(self.kills, 3)}{'+' if self.kills >= 3 else ''}")
        event(f"an output was reused: {any(r['output_file_id'] is None for r in rows)}")
        served = self._served_by_digest(rows)
        for rel, data in self.files.items():
            latest = max((r for r in rows if r["path"] == rel), key=lambda r: r["id"])
            assert latest["status"] == "completed", (rel, latest["error_message"])
            assert latest["sha256"] == _digest(data), f"{rel}: the row is for another version"
            assert latest["output"], f"{rel}: completed without an output"
            output = (self.outbox / latest["output"]).read_bytes()
            assert output in served[latest["sha256"]], f"{rel}: output is not the hub's"
            assert not (self.outbox / error_file_for(rel)).exists(), f"{rel}: stale error file"
        assert not [p for p in outbox_files(self.outbox) if TEMP_MARKER in p], "temp file left"
        ledger = self.server.hub.ledger()
        uploaded = {entry["sha256"] for entry in ledger["uploads"]}
        assert uploaded <= self.written, "an upload held bytes no writer finished"
        bound = self.versions + self.kills
        assert len(ledger["jobs"]) <= bound, f"{len(ledger['jobs'])} remote jobs > {bound}"
        assert integrity(self.db) == "ok"

    def _served_by_digest(self, rows: list[dict[str, object]]) -> dict[str, list[bytes]]:
        """For each input content, the outputs the hub served for it."""
        served: dict[str, list[bytes]] = {}
        for row in rows:
            if row["output_file_id"] and row["sha256"]:
                download = self.server.hub.open_download(str(row["output_file_id"]))
                served.setdefault(str(row["sha256"]), []).append(download.path.read_bytes())
        return served


HotFolder.TestCase.settings = settings(
    max_examples=8,
    stateful_step_count=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(400)  # dozens of real daemon starts on a loaded 2-core machine
class TestHotFolder(HotFolder.TestCase):  # type: ignore[name-defined,misc]
    """Hypothesis state machine over inbox changes, hub faults and SIGKILLs."""
