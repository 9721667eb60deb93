"""Every error code the daemon can store or show has its sentence in docs/troubleshooting.md."""

from __future__ import annotations

import re

from daemon.advice import ADVICE, HTTP_CODE, HUB_CODE, advice_for
from tests.tooling import REPO

DOC = REPO / "docs" / "troubleshooting.md"
# Where a code is given in daemon/: ``code="x"`` (and ``code = "x"`` on error classes),
# ``error_code="x"``, a fault policy's ``Hold(..., "x", ...)``, a refused record
# ``("x", problem)`` and ``else "x"`` defaults; in daemon/inbox also intake's refusals
# ``return "x", message`` and refusal records ``("x", reason)`` (elsewhere those shapes
# are explain's one-word states; a call ``f("x", ...)`` or ``in ("x", ...)`` is neither).
CODE_PATTERNS = (
    re.compile(r"\b(?:error_)?code\s*=\s*f?\"([a-z][a-z0-9_{}]*)\""),
    re.compile(r"\bHold\(\w+, \"([a-z_]+)\""),
    re.compile(r"\(\"([a-z_]+)\", route_problem\)"),
    re.compile(r"\bcode = [^\n]* else \"([a-z_]+)\""),
)
REFUSALS = re.compile(r"^\s*return \"([a-z_]+)\", ", re.MULTILINE)
RECORDS = re.compile(r"(?<![\w.])(?<!in )\(\"([a-z_]+)\", (?![a-z_]+=)")


def documented() -> dict[str, tuple[str, str]]:
    """The error-code table of docs/troubleshooting.md: code -> (meaning, action)."""
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("## Error codes") :]
    rows = re.findall(r"^\| (`[^`]+`|\([^)]+\)) \| (.+) \| (.+) \|$", table, re.MULTILINE)
    return {code.strip("`"): (meaning, action) for code, meaning, action in rows}


def raised_codes() -> set[str]:
    """Every code given in daemon/ (the emulator's own hub codes aside)."""
    found: set[str] = set()
    for path in (REPO / "daemon").rglob("*.py"):
        if "emulator" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in CODE_PATTERNS:
            found.update(pattern.findall(text))
        if "inbox" in path.parts:
            found.update(REFUSALS.findall(text))
            found.update(RECORDS.findall(text))
    return {HTTP_CODE if code.startswith("http_{") else code for code in found}


def test_the_table_is_the_advice_the_daemon_gives() -> None:
    """The docs' table holds exactly the meaning and the action the daemon writes itself."""
    table = documented()
    assert table == {code: (a.meaning, a.action) for code, a in ADVICE.items()}


def test_every_code_raised_in_the_daemon_is_in_the_table() -> None:
    """Each code raised, refused or held with in daemon/ has its row (no code left out)."""
    codes = raised_codes()
    # The collector sees every kind of place a code is given (else it proves nothing).
    assert {"too_large", "disk_full", "bad_response", "remote_failed", "input_kept"} <= codes
    assert {"bad_folder_settings", "auth_rejected", HTTP_CODE, "already_running"} <= codes
    assert {"path_too_long", "read_error"} <= codes
    missing = sorted(codes - set(documented()))
    assert missing == [], f"codes without a row in {DOC.name}: {missing}"


def test_codes_of_the_hub_and_http_statuses_get_their_rows() -> None:
    """A hub's own code gets the hub's row, an HTTP status the http row, 413 its own."""
    assert advice_for("invalid_input") is ADVICE[HUB_CODE]
    assert advice_for(None) is ADVICE[HUB_CODE]
    assert advice_for("http_502") is ADVICE[HTTP_CODE]
    assert not advice_for("http_413").retry_helps
    assert not advice_for("too_large").retry_helps
    assert advice_for("not_found").retry_helps


def test_every_sentence_is_plain() -> None:
    """No row carries jargon an office administrator cannot act on (errno, exceptions)."""
    jargon = re.compile(r"Errno|Exception|Error:|Traceback|\bNone\b|httpx|sqlite3")
    for code, (meaning, action) in documented().items():
        assert not jargon.search(meaning + action), code
        assert meaning.endswith("."), code
        assert action.endswith("."), code
