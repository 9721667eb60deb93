"""``usage``: periods, grouping, and the pages the emulator billed, per folder and in total."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from daemon.config import load_settings
from daemon.emulator.hub import pages_billed, paid_conversions
from daemon.emulator.server import EmulatorServer
from daemon.inbox.inputs import inspect_input
from daemon.jobs.store import Store
from daemon.jobs.views import Billed, Views
from daemon.ops import usage
from daemon.service import run_service
from tests.conftest import daemon_config
from tests.helpers import input_name
from tests.scans import make_scan


def ts(text: str) -> float:
    """Epoch seconds of an ISO time in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


NOW = ts("2025-03-10T15:30:00")


def billed(path: str, pages: int, at: str, rule: str | None = "defaults") -> Billed:
    """One billed conversion."""
    folder = path.split("/", maxsplit=1)[0] if "/" in path else ""
    return Billed(path, folder, rule, pages, "completed", ts(at))


# -- pure: periods --------------------------------------------------------------------------


def test_default_period_is_the_current_utc_month() -> None:
    """No option: from the first of this month to the first of the next (UTC)."""
    period = usage.parse_period(NOW)
    assert period.to_json() == {"from": "2025-03-01T00:00:00Z", "to": "2025-04-01T00:00:00Z"}
    december = usage.parse_period(ts("2025-12-31T23:59:59"))
    assert december.to_json()["to"] == "2026-01-01T00:00:00Z"


def test_month_option_names_a_whole_month() -> None:
    """--month 2024-02 is February 2024, leap day included."""
    period = usage.parse_period(NOW, month="2024-02")
    assert period.to_json() == {"from": "2024-02-01T00:00:00Z", "to": "2024-03-01T00:00:00Z"}


def test_since_and_until_dates_count_whole_days() -> None:
    """--since a date starts at its midnight; --until a date includes that day; a time is exact."""
    period = usage.parse_period(NOW, since="2025-03-02", until="2025-03-05")
    assert period.to_json() == {"from": "2025-03-02T00:00:00Z", "to": "2025-03-06T00:00:00Z"}
    exact = usage.parse_period(NOW, since="2025-03-02T08:00", until="2025-03-02T09:30+01:00")
    assert exact.to_json() == {"from": "2025-03-02T08:00:00Z", "to": "2025-03-02T08:30:00Z"}
    assert usage.parse_period(NOW, since="2025-03-09").end == NOW  # up to now


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"month": "2025-13"}, "not a month"),
        ({"month": "March"}, "not a month"),
        ({"since": "yesterday"}, "not a date"),
        ({"until": "2025-03-01"}, "--until needs --since"),
        ({"since": "2025-03-05", "until": "2025-03-01"}, "empty"),
        ({"month": "2025-03", "since": "2025-03-01"}, "cannot be combined"),
    ],
)
def test_a_bad_period_is_refused_with_the_reason(options: dict[str, str], said: str) -> None:
    """A period that cannot be read, or is empty, says why."""
    with pytest.raises(ValueError, match=said):
        usage.parse_period(NOW, **options)


def test_day_and_month_bounds_are_utc() -> None:
    """The budget's periods: the UTC day and calendar month around a moment."""
    assert usage.day_bounds(NOW) == (ts("2025-03-10T00:00:00"), ts("2025-03-11T00:00:00"))
    assert usage.month_bounds(NOW) == (ts("2025-03-01T00:00:00"), ts("2025-04-01T00:00:00"))


# -- pure: grouping -------------------------------------------------------------------------

ROWS = [
    billed("sales/eu/a.pdf", 3, "2025-03-01T10:00:00", "rules[1] sales/**"),
    billed("sales/us/b.pdf", 2, "2025-03-02T10:00:00", "rules[1] sales/**"),
    billed("sales/c.png", 1, "2025-03-02T11:00:00", "rules[1] sales/**"),
    billed("hr/d.tif", 4, "2025-03-02T12:00:00", None),
    billed("top.jpg", 1, "2025-03-03T00:00:00"),
    billed("hr/late.pdf", 9, "2025-04-01T00:00:00"),  # next month: outside
]


def keyed(found: usage.Usage) -> dict[str, tuple[int, int]]:
    """Rows as key -> (files, pages)."""
    return {row.key: (row.files, row.pages) for row in found.rows}


def test_grouping_by_folder_at_a_depth() -> None:
    """Depth 1 groups by the first folder, depth 2 by two; files at the top have key ""."""
    march = usage.parse_period(NOW)
    first = usage.summarize(ROWS, march)
    assert keyed(first) == {"": (1, 1), "hr": (1, 4), "sales": (3, 6)}
    assert (first.files, first.pages) == (5, 11)
    second = usage.summarize(ROWS, march, "folder", depth=2)
    assert keyed(second) == {
        "": (1, 1),
        "hr": (1, 4),
        "sales": (1, 1),
        "sales/eu": (1, 3),
        "sales/us": (1, 2),
    }


def test_grouping_by_rule_day_and_month() -> None:
    """By rule (none: "defaults"), UTC day and month; every grouping has the same totals."""
    march = usage.parse_period(NOW)
    assert keyed(usage.summarize(ROWS, march, "rule")) == {
        "defaults": (2, 5),
        "rules[1] sales/**": (3, 6),
    }
    assert keyed(usage.summarize(ROWS, march, "day")) == {
        "2025-03-01": (1, 3),
        "2025-03-02": (3, 7),
        "2025-03-03": (1, 1),
    }
    spring = usage.parse_period(NOW, since="2025-03-01", until="2025-04-30")
    assert keyed(usage.summarize(ROWS, spring, "month")) == {"2025-03": (5, 11), "2025-04": (1, 9)}


def test_json_csv_and_text_forms() -> None:
    """--json is exactly the contract's object; --csv has a header and a line per key."""
    found = usage.summarize(ROWS, usage.parse_period(NOW), "folder")
    assert found.to_json() == {
        "period": {"from": "2025-03-01T00:00:00Z", "to": "2025-04-01T00:00:00Z"},
        "files": 5,
        "pages": 11,
        "rows": [
            {"key": "", "files": 1, "pages": 1},
            {"key": "hr", "files": 1, "pages": 4},
            {"key": "sales", "files": 3, "pages": 6},
        ],
    }
    assert usage.to_csv(found) == "folder,files,pages\n,1,1\nhr,1,4\nsales,3,6\n"
    text = usage.render(found)
    assert "from 2025-03-01 00:00 to 2025-04-01 00:00 UTC, by folder" in text
    assert text.splitlines()[-1].split() == ["total", "5", "11"]
    assert "(inbox)" in text


# -- end to end: what the emulator billed -------------------------------------------------------

INPUTS = {  # path -> (format, pages)
    "sales/q1.pdf": ("pdf", 3),
    "sales/eu/q2.pdf": ("pdf", 5),
    "sales/eu/fax.tif": ("tiff", 2),
    "hr/cv.png": ("png", 1),
    "hr/photo.jpeg": ("jpeg", 1),
    "hr/form.bmp": ("bmp", 1),
    "memo.pdf": ("pdf", 2),
}


def drop_inputs(inbox: Path) -> None:
    """Write every input of ``INPUTS`` (multi-page PDFs and TIFFs, single images)."""
    for seed, (rel, (fmt, pages)) in enumerate(INPUTS.items()):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(make_scan(fmt, 300 + seed, pages=pages))


def billed_per_folder(ledger: dict[str, Any]) -> Counter[str]:
    """Pages the emulator billed per first folder below the inbox ("" at the top)."""
    # Uploads carry the extension of their content's type: go by the (unique) stem.
    folder_of = {Path(rel).stem: rel.split("/")[0] if "/" in rel else "" for rel in INPUTS}
    per_folder: Counter[str] = Counter()
    for job in ledger["jobs"]:
        per_folder[folder_of[Path(input_name(job["filename"])).stem]] += job["input_pages"]
    return per_folder


def usage_json(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """``usage --json`` with ``args``, parsed."""
    capsys.readouterr()
    assert main(["usage", "-c", str(config), "--json", *args]) == 0
    payload: dict[str, Any] = json.loads(capsys.readouterr().out)
    return payload


def usage_csv(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> list[list[str]]:
    """``usage --csv`` with ``args``, as rows (header first)."""
    capsys.readouterr()
    assert main(["usage", "-c", str(config), "--csv", *args]) == 0
    return list(csv.reader(io.StringIO(capsys.readouterr().out)))


def test_pages_are_counted_at_intake_as_the_hub_bills_them(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """Intake's page count of every input equals the pages the emulator bills for it."""
    drop_inputs(folders["inbox"])
    for rel, (_, pages) in INPUTS.items():
        assert inspect_input(folders["inbox"], rel, allow_hardlinks=False).pages == pages


def test_usage_equals_what_the_emulator_billed(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """usage --json equals the emulator's billed pages per folder and in total; --csv and
    --by day|rule|month agree; the jobs carry the pages counted at intake; purge keeps it."""
    drop_inputs(folders["inbox"])
    config = daemon_config(tmp_path, folders, emulator.url, on_success="delete")
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.exit_code == 0
    ledger = emulator.hub.ledger()
    total = pages_billed(ledger)
    assert total == sum(pages for _, pages in INPUTS.values()) == 15
    expected = dict(billed_per_folder(ledger))

    found = usage_json(config, capsys)
    assert (found["files"], found["pages"]) == (paid_conversions(ledger), total)
    assert {r["key"]: r["pages"] for r in found["rows"]} == expected
    assert {r["key"]: r["files"] for r in found["rows"]} == {"": 1, "hr": 3, "sales": 3}

    table = usage_csv(config, capsys)
    assert table[0] == ["folder", "files", "pages"]
    assert {key: (int(files), int(pages)) for key, files, pages in table[1:]} == {
        r["key"]: (r["files"], r["pages"]) for r in found["rows"]
    }
    deeper = usage_json(config, capsys, "--depth", "2")
    assert {r["key"]: r["pages"] for r in deeper["rows"]}["sales/eu"] == 7
    for by in ("day", "rule", "month"):
        grouped = usage_json(config, capsys, "--by", by)
        assert (grouped["files"], grouped["pages"]) == (found["files"], total)
        assert sum(r["pages"] for r in grouped["rows"]) == total
        assert sum(int(r[2]) for r in usage_csv(config, capsys, "--by", by)[1:]) == total
    assert [r["key"] for r in usage_json(config, capsys, "--by", "rule")["rows"]] == ["defaults"]

    store = Store(load_settings(config).database_url)
    try:
        assert {job.path: job.pages for job in Views(store).jobs()} == {
            rel: pages for rel, (_, pages) in INPUTS.items()
        }
    finally:
        store.close()
    assert main(["purge", "-c", str(config), "--completed", "--older-than", "0s"]) == 0
    assert "purged 7 job(s)" in capsys.readouterr().out
    assert usage_json(config, capsys) == found  # purging jobs keeps what was billed


def test_usage_of_another_month_is_empty_and_refuses_bad_periods(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A month with nothing billed prints zeros; an unreadable period exits 2 saying why."""
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9")
    store = Store(load_settings(config).database_url)
    store.close()
    found = usage_json(config, capsys, "--month", "2001-01")
    assert found == {
        "period": {"from": "2001-01-01T00:00:00Z", "to": "2001-02-01T00:00:00Z"},
        "files": 0,
        "pages": 0,
        "rows": [],
    }
    assert main(["usage", "-c", str(config), "--since", "soon"]) == 2
    assert "not a date" in capsys.readouterr().err
