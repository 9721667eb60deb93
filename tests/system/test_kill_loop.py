"""Crash safety under SIGKILL at random moments (a short run of bench/kill_loop.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.kill_loop import run


@pytest.mark.timeout(400)  # 30 restarts of a real process; slow on a loaded 2-core machine
def test_kill_loop_loses_nothing_and_repeats_nothing(
    tmp_path: Path, fault_counts: Callable[[str, str], None]
) -> None:
    """100 files, 30 SIGKILLs: one byte-identical output each, remote jobs <= files + kills."""
    result = run(tmp_path, files=100, kills=30, seed=7)
    fault_counts("kill loop", result.line().removeprefix("kill loop: "))
    assert result.kills == 30
    assert result.kills_mid_work >= 15, "at least half the kills land while work is in flight"
    assert result.remote_jobs <= 130
