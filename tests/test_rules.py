"""Routing rules: glob matching, precedence, folder files and validation against the hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.rules import (
    FolderFileError,
    Offer,
    RouteFields,
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
