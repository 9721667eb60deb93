"""Health: pure judgements, the heartbeat file, the ``health`` command and the deadman."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.ops.health import (
    Deadman,
    Heartbeat,
    Liveness,
    assess,
    read_heartbeat,
    stalled,
    status_line,
    verdict,
    write_heartbeat,
)
from tests.conftest import write_config

NOW = 1_800_000_000.0
ALIVE = Liveness(watcher=True, intake=True, pipeline=True)


def beat(**changes: object) -> Heartbeat:
    values: dict[str, object] = {
        "time": NOW,
        "pid": 4242,
        "started_at": NOW - 600,
        "healthy": True,
        "counts": {"queued": 2, "processing": 1, "completed": 9, "failed": 1},
        "oldest_waiting_at": NOW - 90,
        "in_flight": 1,
    }
    values.update(changes)
    return Heartbeat(**values)  # type: ignore[arg-type]


def test_assess_names_each_dead_part() -> None:
    """Every dead part and a database that does not answer is a problem, in words."""
    assert assess(ALIVE, None, 60) == []
    assert assess(ALIVE, 5.0, 60) == []
    dead = Liveness(watcher=False, intake=False, pipeline=False)
    problems = " ".join(assess(dead, 61.0, 60))
    for words in ("watcher", "intake", "pipeline", "state database has not answered for 61 s"):
        assert words in problems


def test_a_paused_pipeline_is_not_a_fault() -> None:
    """A rejected key pauses work but the daemon is healthy: restarting would not help."""
    assert assess(Liveness(True, True, True, paused="key rejected"), None, 60) == []
    ok, notes = verdict(beat(paused="the LDX hub rejected the API key"), NOW + 1, 60)
    assert ok
    assert "paused" in notes[1]


def test_verdict_not_running_stuck_blind_and_healthy() -> None:
    """No heartbeat, a stale one, an unhealthy one and a fresh healthy one."""
    ok, notes = verdict(None, NOW, 60)
    assert not ok
    assert "not running" in notes[0]
    ok, notes = verdict(beat(), NOW + 61, 60)
    assert not ok
    assert "stuck" in notes[0]
    blind = beat(healthy=False, problems=["the inbox watcher has stopped"])
    assert verdict(blind, NOW + 1, 60) == (False, ["the inbox watcher has stopped"])
    ok, notes = verdict(beat(), NOW + 3, 60)
    assert ok
    assert "pid 4242" in notes[0]


def test_status_line_shows_counts_age_and_trouble() -> None:
    """STATUS= carries the counts, the oldest wait, a pause and any problem."""
    line = status_line(beat(), NOW)
    assert line == "2 queued, 1 processing, 9 completed, 1 failed; oldest waiting 90 s"
    sick = status_line(beat(paused="key rejected", problems=["pipeline dead"]), NOW)
    assert "PAUSED: key rejected" in sick
    assert "UNHEALTHY: pipeline dead" in sick


def test_heartbeat_file_round_trip(tmp_path: Path) -> None:
    """What the daemon writes is what ``health`` reads; garbage reads as no heartbeat."""
    path = tmp_path / "heartbeat.json"
    write_heartbeat(path, beat())
    assert read_heartbeat(path) == beat()
    assert [p.name for p in tmp_path.iterdir()] == ["heartbeat.json"]
    path.write_text("{not json", encoding="utf-8")
    assert read_heartbeat(path) is None
    assert read_heartbeat(tmp_path / "missing.json") is None


@pytest.mark.parametrize(
    ("heartbeat", "code", "words"),
    [
        (None, 1, "not running"),
        (beat(time=NOW - 3600), 1, "stuck"),
        (beat(healthy=False, problems=["the inbox watcher has stopped"]), 1, "watcher"),
        (beat(), 0, "healthy"),
    ],
)
def test_health_command(
    tmp_path: Path,
    folders: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    heartbeat: Heartbeat | None,
    code: int,
    words: str,
) -> None:
    """``health`` exits 0 only for a fresh, healthy heartbeat, and says why otherwise."""
    path = folders["state"] / "heartbeat.json"
    config = write_config(
        tmp_path / "c.toml",
        {
            "inbox": str(folders["inbox"]),
            "outbox": str(folders["outbox"]),
            "state_db": str(folders["state"] / "state.db"),
            "stall_timeout": 60.0,
        },
    )
    if heartbeat is not None:
        fresh = time.time() - (NOW - heartbeat.time)  # keep the heartbeat's age
        write_heartbeat(path, Heartbeat(**{**heartbeat.__dict__, "time": fresh}))
    assert main(["health", "-c", str(config)]) == code
    assert words in capsys.readouterr().out
    assert main(["health", "--json", "-c", str(config)]) == code
    payload = json.loads(capsys.readouterr().out)
    assert payload["healthy"] is (code == 0)
    assert payload["heartbeat"] == str(path)


def test_stalled_is_a_pure_decision() -> None:
    """The loop counts as stuck only once it missed its beats for longer than the timeout."""
    assert not stalled(100.0, 50.0, 60.0)
    assert stalled(111.0, 50.0, 60.0)


def test_deadman_fires_when_the_loop_stops_beating() -> None:
    """The deadman thread calls its exit when the last beat is older than the timeout."""
    fired = threading.Event()
    ages: list[float] = []

    def on_stall(age: float) -> None:
        ages.append(age)
        fired.set()

    deadman = Deadman(
        lambda: 0.0, 60.0, on_stall=on_stall, check_every=0.01, monotonic=lambda: 100.0
    )
    deadman.start()
    assert fired.wait(10)
    deadman.join(10)
    assert ages == [100.0]


def test_deadman_stays_quiet_while_beats_arrive() -> None:
    """A beating loop never trips the deadman, and stop() ends the thread."""
    checks = threading.Event()
    count = 0

    def now() -> float:
        nonlocal count
        count += 1
        if count > 20:
            checks.set()
        return 100.0

    deadman = Deadman(
        lambda: 99.0,
        60.0,
        on_stall=lambda _age: pytest.fail("fired"),
        check_every=0.001,
        monotonic=now,
    )
    deadman.start()
    assert checks.wait(10)
    deadman.stop()
    deadman.join(10)
    assert not deadman.is_alive()
