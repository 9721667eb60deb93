"""Health: pure judgements, the health socket, the ``health`` command and the deadman."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import load_settings
from daemon.emulator.server import EmulatorServer
from daemon.errors import ConfigError
from daemon.ops.health import (
    Deadman,
    Heartbeat,
    Liveness,
    assess,
    outage_line,
    stalled,
    status_line,
    verdict,
)
from daemon.ops.healthsock import HealthSocket, ask
from tests.conftest import daemon_config, write_config
from tests.helpers import cli, daemon_in_process, wait_async, wait_for

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


def test_work_held_for_a_person_is_not_healthy_but_no_fault() -> None:
    """A rejected key: health fails with the reason, yet the daemon never exits for it."""
    assert assess(Liveness(True, True, True, paused="key rejected"), None, 60) == []
    ok, notes = verdict(beat(paused="the LDX hub rejected the API key"), NOW + 1, 60)
    assert not ok
    assert notes == ["work is held until a person acts: the LDX hub rejected the API key"]


def test_a_hub_outage_is_held_but_healthy() -> None:
    """The hub down: healthy, saying since when and how much work waits."""
    line = outage_line(NOW - 120, "GET /files: no connection", beat().counts)
    assert line.startswith("hub unreachable since 2027-01-15 07:58:00 UTC; 3 held,")
    assert "; 3 held, nothing fails" in line
    ok, notes = verdict(beat(outage=line), NOW + 1, 60)
    assert ok
    assert notes[1] == line
    assert "HELD: hub unreachable since" in status_line(beat(outage=line), NOW)


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


def test_health_socket_round_trip(tmp_path: Path) -> None:
    """What the daemon keeps is what ``health`` gets; no socket, no beat or a closed one
    reads as no heartbeat, and closing removes the socket."""
    path = tmp_path / "health.sock"
    assert ask(path) is None
    latest: list[Heartbeat | None] = [None]
    answer = HealthSocket(path, lambda: latest[0]).start()
    try:
        assert ask(path) is None  # running, but no beat taken yet
        latest[0] = beat(paused="key rejected")
        assert ask(path) == beat(paused="key rejected")
        assert [p.name for p in tmp_path.iterdir()] == ["health.sock"]
        assert path.stat().st_mode & 0o777 == 0o600  # the daemon's user's alone
    finally:
        answer.close()
    assert not path.exists()
    assert ask(path) is None


def test_health_socket_in_a_deep_folder(tmp_path: Path) -> None:
    """A path longer than a Unix socket address still works (through the folder's fd)."""
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 6)
    deep.mkdir(parents=True)
    path = deep / "health.sock"
    assert len(str(path)) > 108
    answer = HealthSocket(path, beat).start()
    try:
        assert ask(path) == beat()
    finally:
        answer.close()


def test_health_socket_replaces_a_stale_one_and_refuses_a_live_one(tmp_path: Path) -> None:
    """A socket a killed daemon left is replaced; one another daemon answers on, or a
    file that is no socket, is a configuration error."""
    path = tmp_path / "health.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: as after kill -9
    first = HealthSocket(path, beat).start()
    try:
        assert ask(path) == beat()
        with pytest.raises(ConfigError, match="another daemon answers"):
            HealthSocket(path, beat).start()
        assert ask(path) == beat()
    finally:
        first.close()
    path.write_text("not a socket", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a socket"):
        HealthSocket(path, beat).start()


@pytest.mark.parametrize(
    ("heartbeat", "code", "words"),
    [
        (None, 1, "not running"),
        (beat(time=NOW - 3600), 1, "stuck"),
        (beat(healthy=False, problems=["the inbox watcher has stopped"]), 1, "watcher"),
        (beat(paused="the LDX hub rejected the API key"), 1, "held until a person acts"),
        (beat(outage="hub unreachable since 10:00; 3 held"), 0, "hub unreachable since"),
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
    """``health`` exits 0 only for a fresh, healthy heartbeat (an outage included), and
    says why otherwise."""
    path = folders["state"] / "health.sock"
    config = write_config(
        tmp_path / "c.toml",
        {
            "inbox": str(folders["inbox"]),
            "outbox": str(folders["outbox"]),
            "state_db": str(folders["state"] / "state.db"),
            "stall_timeout": 60.0,
        },
    )
    answer = None
    if heartbeat is not None:
        fresh = time.time() - (NOW - heartbeat.time)  # keep the heartbeat's age
        kept = Heartbeat(**{**heartbeat.__dict__, "time": fresh})
        answer = HealthSocket(path, lambda: kept).start()
    try:
        assert main(["health", "-c", str(config)]) == code
        assert words in capsys.readouterr().out
        assert main(["health", "--json", "-c", str(config)]) == code
    finally:
        if answer is not None:
            answer.close()
    payload = json.loads(capsys.readouterr().out)
    assert payload["healthy"] is (code == 0)
    assert payload["socket"] == str(path)
    if heartbeat is not None and (heartbeat.paused or heartbeat.outage):
        assert payload["held"] == (heartbeat.paused or heartbeat.outage)


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


def test_a_stuck_loop_still_answers_and_health_says_stuck(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """The socket answers from its own thread: with the event loop stuck, ``health``
    still gets an answer, and it says the daemon is stuck (exit 1)."""
    config = daemon_config(
        tmp_path, folders, emulator.url, heartbeat_interval=0.1, stall_timeout=1.0
    )
    settings = load_settings(config)
    answers: list[subprocess.CompletedProcess[str]] = []

    def health_while_stuck(done: threading.Event) -> None:
        wait_for(lambda: cli(config, "health").returncode == 1, 30, "health to see it stuck")
        answers.append(cli(config, "health"))
        done.set()

    async def scenario() -> subprocess.CompletedProcess[str]:
        async with daemon_in_process(settings) as service:
            assert service.supervisor is not None
            monitor = service.supervisor.monitor
            await wait_async(lambda: monitor.latest is not None, 30, "the first beat")
            healthy = await asyncio.to_thread(cli, config, "health")
            done = threading.Event()
            threading.Thread(target=health_while_stuck, args=(done,), daemon=True).start()
            done.wait(60)  # blocks the event loop itself, as a stuck step would
            return healthy

    healthy = asyncio.run(scenario())
    assert healthy.returncode == 0, healthy.stdout
    assert answers, "health never saw the stuck loop"
    assert answers[0].returncode == 1
    assert "stuck" in answers[0].stdout
