"""A smoke run of the performance benchmarks (bench/perf.py): they run and print a table.

No timing is asserted: the suite runs on shared, noisy machines, and at this scale the
numbers mean nothing. The real runs are made by hand (see README, "Performance").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import perf


@pytest.mark.timeout(400)  # seven scenarios, each starting real processes
def test_every_benchmark_runs_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every scenario completes at a tiny scale and lands in the table."""
    assert perf.main(["--runs", "1", "--scale", "0.002", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for plan in perf.PLANS:
        for measure in plan.measures:
            assert f"{plan.title}: {measure.label}" in out, measure.key
