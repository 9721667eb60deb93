"""Routing rules: glob matching, precedence, folder files and validation against the hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import FolderFileError
from daemon.inbox.routing import (
    Offer,
    RouteFields,
    Router,
    Rule,
    check_rules,
    first_rule,
    folder_files_for,
    glob_regex,
    parse_folder_file,
    read_folder_file,
    route,
)

DEFAULTS = {"engine": "ki/ocr", "language": "jpn", "output_format": "docx", "on_success": "keep"}
OFFER = Offer({"ki/ocr": (frozenset({"jpn", "eng", "Auto"}), frozenset({"docx", "xlsx", "pptx"}))})


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("invoices/**", "invoices/a.pdf", True),
        ("invoices/**", "invoices/2026/03/a.pdf", True),
        ("invoices/**", "other/invoices/a.pdf", False),
        ("**/*.png", "a/b/c.PNG", True),
        ("**/*.png", "c.png", True),
        ("letters/*.pdf", "letters/x/y.pdf", False),
        ("scan?.tif", "scan1.tif", True),
    ],
)
def test_globs(pattern: str, path: str, hit: bool) -> None:
    """* stays in a folder, ** spans folders, matching ignores case."""
    assert bool(glob_regex(pattern).match(path)) is hit


def test_first_matching_rule_wins() -> None:
    """Rules are tried in order; the first match decides."""
    rules = [Rule(match="invoices/**", output_format="xlsx"), Rule(match="**", language="eng")]
    assert first_rule(rules, "invoices/a.pdf") == (1, rules[0])
    assert first_rule(rules, "x.pdf") == (2, rules[1])
    assert first_rule([], "x.pdf") is None


def test_route_precedence_rule_over_folder_over_defaults() -> None:
    """A rule's fields win over the nearest folder file, which wins over [hub]."""
    rules = [Rule(match="slides/**", output_format="pptx")]
    folder = {"slides/.ldx-hotfolder.toml": RouteFields(output_format="xlsx", language="eng")}
    chosen = route("slides/deck.pdf", rules, folder.get, DEFAULTS)
    assert (chosen.output_format, chosen.language, chosen.engine) == ("pptx", "eng", "ki/ocr")
    assert chosen.source == "rules[1] slides/** + folder slides/.ldx-hotfolder.toml"
    plain = route("x.pdf", rules, folder.get, DEFAULTS)
    assert plain.source == "defaults"
    assert plain.output_format == "docx"


def test_nearest_folder_file_wins() -> None:
    """A folder file deeper in the tree overrides one nearer the inbox root."""
    assert folder_files_for("a/b/c.pdf") == [
        "a/b/.ldx-hotfolder.toml",
        "a/.ldx-hotfolder.toml",
        ".ldx-hotfolder.toml",
    ]
    files = {
        "a/.ldx-hotfolder.toml": RouteFields(language="eng"),
        "a/b/.ldx-hotfolder.toml": RouteFields(language="Auto"),
    }
    assert route("a/b/c.pdf", [], files.get, DEFAULTS).language == "Auto"
    assert route("a/x.pdf", [], files.get, DEFAULTS).language == "eng"


def test_folder_file_parsing(tmp_path: Path) -> None:
    """Folder files accept the rule fields only, with clear errors."""
    assert parse_folder_file('output_format = "xlsx"\n', "f").output_format == "xlsx"
    with pytest.raises(FolderFileError, match="output_format"):
        parse_folder_file('output_format = "odt"\n', "x/.ldx-hotfolder.toml")
    with pytest.raises(FolderFileError, match="colour"):
        parse_folder_file('colour = "red"\n', "x/.ldx-hotfolder.toml")
    with pytest.raises(FolderFileError, match="not valid TOML"):
        parse_folder_file("output_format = \n", "x")
    assert read_folder_file(tmp_path, "none/.ldx-hotfolder.toml") is None


def test_check_rules_names_rule_and_choices() -> None:
    """An unknown language or format names the rule and lists the valid values."""
    rules = [Rule(match="a/**", language="klingon"), Rule(match="b/**", output_format="xlsx")]
    problems = check_rules(rules, DEFAULTS, OFFER)
    assert len(problems) == 1
    assert "rules[1] (match 'a/**')" in problems[0]
    assert "valid: Auto, eng, jpn" in problems[0]
    bad_engine = check_rules([], {**DEFAULTS, "engine": "x/y"}, OFFER)
    assert bad_engine == ["[hub]: engine 'x/y' is not offered (valid: ki/ocr)"]


def archiving_inbox(tmp_path: Path) -> Path:
    """An inbox whose folder "scans" has a folder file saying on_success = "archive"."""
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / ".ldx-hotfolder.toml").write_text(
        'on_success = "archive"\n', encoding="utf-8"
    )
    return tmp_path


def test_folder_file_archiving_without_archive_dir_is_its_problem(tmp_path: Path) -> None:
    """A folder file's on_success = archive without archive_dir fails its files, naming it."""
    router = Router(archiving_inbox(tmp_path), [], DEFAULTS, archive_dir_set=False)
    chosen, problem = router.route("scans/a.pdf")
    assert chosen.on_success == "archive"
    assert problem == (
        "folder scans/.ldx-hotfolder.toml: on_success = 'archive' needs archive_dir, "
        "which the daemon's configuration does not set"
    )
    assert router.route("other/b.pdf")[1] is None


def test_folder_file_archiving_is_fine_with_archive_dir_or_a_rule_overriding(
    tmp_path: Path,
) -> None:
    """With archive_dir set, or a rule choosing on_success itself, the folder file is fine."""
    inbox = archiving_inbox(tmp_path)
    assert Router(inbox, [], DEFAULTS).route("scans/a.pdf")[1] is None
    keep = [Rule(match="scans/**", on_success="keep")]
    chosen, problem = Router(inbox, keep, DEFAULTS, archive_dir_set=False).route("scans/a.pdf")
    assert (chosen.on_success, problem) == ("keep", None)


def test_folder_file_values_are_checked_against_the_hub_under_a_rule_too(tmp_path: Path) -> None:
    """A folder file's unknown language is its problem even when a rule also matches the file."""
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / ".ldx-hotfolder.toml").write_text(
        'language = "martian"\n', encoding="utf-8"
    )
    router = Router(tmp_path, [Rule(match="scans/**", output_format="xlsx")], DEFAULTS)
    router.offer = OFFER
    chosen, problem = router.route("scans/a.pdf")
    assert (chosen.language, chosen.output_format) == ("martian", "xlsx")
    assert problem is not None
    assert "language 'martian' is not offered" in problem
    assert problem.startswith("rules[1] scans/** + folder scans/.ldx-hotfolder.toml: ")
