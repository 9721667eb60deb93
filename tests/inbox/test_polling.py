"""The lean polling emitter (daemon/polling.py): its listing, its comparison, and a real
observer polling a real folder."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from daemon.inbox.polling import LeanPollingObserver, Snapshot, changes, snapshot
from tests.helpers import wait_for

PATHS = st.sampled_from([f"/in/{name}" for name in ("a", "b", "c", "d/e", "d/f")])
ENTRIES = st.tuples(st.integers(1, 3), st.integers(0, 2), st.integers(0, 2), st.booleans())
SNAPSHOTS = st.dictionaries(PATHS, ENTRIES, max_size=5)


@given(SNAPSHOTS, SNAPSHOTS)
def test_changes_are_exactly_the_new_or_changed_files_and_the_new_folders(
    before: Snapshot, after: Snapshot
) -> None:
    """Every new or changed file is reported (new flagged), every new folder too, nothing else."""
    found = {path: (is_dir, new) for path, is_dir, new in changes(before, after)}
    expected = {}
    for path, entry in after.items():
        old = before.get(path)
        if not entry[3] and old != entry:
            expected[path] = (False, old is None)
        elif entry[3] and (old is None or not old[3] or old[0] != entry[0]):
            expected[path] = (True, True)
    assert found == expected


def test_a_folder_whose_mtime_alone_changed_is_no_news() -> None:
    """A folder's own mtime moves when its entries change; the entries carry the news."""
    before: Snapshot = {"/in/d": (7, 4096, 1, True)}
    assert changes(before, {"/in/d": (7, 4096, 2, True)}) == []
    assert changes(before, {"/in/d": (8, 4096, 2, True)}) == [("/in/d", True, True)]


def test_snapshot_lists_nested_entries_and_records_links_without_following(
    tmp_path: Path,
) -> None:
    """Nested files and folders are listed with their lstat facts; a linked folder is not walked."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.pdf").write_bytes(b"%PDF")
    (inbox / "a" / "b" / "scan.pdf").write_bytes(b"%PDF-1.4")
    (inbox / "link").symlink_to(outside, target_is_directory=True)
    listed = snapshot(str(inbox))
    assert sorted(listed) == [str(inbox / p) for p in ("a", "a/b", "a/b/scan.pdf", "link")]
    info = os.lstat(inbox / "a" / "b" / "scan.pdf")
    assert listed[str(inbox / "a/b/scan.pdf")] == (info.st_ino, 8, info.st_mtime_ns, False)
    assert listed[str(inbox / "link")][3] is False


class _Recorder(FileSystemEventHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        with self._lock:
            self.events.append((event.event_type, os.fsdecode(event.src_path)))

    def seen(self, kind: str, path: Path) -> bool:
        with self._lock:
            return (kind, str(path)) in self.events

    def so_far(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.events)


def _drop(aside: Path, path: Path, data: bytes) -> None:
    # Written aside, then renamed in: a poll never sees it half-written (one event, not two).
    staged = aside / path.name
    staged.write_bytes(data)
    staged.rename(path)


def test_a_real_observer_reports_each_change_once(tmp_path: Path) -> None:
    """Polling a real folder: new, grown, renamed files and new folders each give one event."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "old.pdf").write_bytes(b"%PDF")  # there before the start: not news
    recorder = _Recorder()
    observer = LeanPollingObserver(polling_interval=0.02)
    observer.schedule(recorder, str(inbox), recursive=True)
    observer.start()
    try:
        wait_for(lambda: all(e.is_alive() for e in observer.emitters), 10, "the emitter")
        _drop(tmp_path, inbox / "new.pdf", b"%PDF")
        wait_for(lambda: recorder.seen("created", inbox / "new.pdf"), 10, "created")
        with (inbox / "new.pdf").open("ab") as grown:
            grown.write(b"-1.4 more")
        wait_for(lambda: recorder.seen("modified", inbox / "new.pdf"), 10, "modified")
        (inbox / "sub").mkdir()
        _drop(tmp_path, inbox / "sub" / "deep.tif", b"II*\x00")
        wait_for(lambda: recorder.seen("created", inbox / "sub" / "deep.tif"), 10, "deep")
        (inbox / "new.pdf").rename(inbox / "renamed.pdf")
        wait_for(lambda: recorder.seen("created", inbox / "renamed.pdf"), 10, "renamed")
    finally:
        observer.stop()
        observer.join(timeout=10)
    events = recorder.so_far()
    assert ("created", str(inbox / "sub")) in events
    assert not any(path == str(inbox / "old.pdf") for _, path in events)
    assert len(events) == len(set(events)), events  # each change reported once


def test_a_vanished_inbox_stops_the_emitter_for_the_watcher_to_restart(tmp_path: Path) -> None:
    """When the polled folder disappears the emitter stops, so the watcher's health check fails."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    observer = LeanPollingObserver(polling_interval=0.02)
    observer.schedule(_Recorder(), str(inbox), recursive=True)
    observer.start()
    try:
        emitters = list(observer.emitters)
        inbox.rmdir()
        wait_for(lambda: not any(e.is_alive() for e in emitters), 10, "the emitter to stop")
    finally:
        observer.stop()
        observer.join(timeout=10)
