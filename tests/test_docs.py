"""The documents a person reads: a short README, links that lead somewhere, references
that cannot drift from the code (every setting, every emulator knob), and a changelog
whose newest release is the program's version."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from pydantic import BaseModel

import daemon
from daemon.config import REMOVED, BudgetSettings, HookSettings, HubSettings, Rule, Settings
from daemon.emulator.knobs import GROUPS
from tests.tooling import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250
QUICK_START = (
    "python3.11 -m venv .venv && .venv/bin/pip install -q . && .venv/bin/ldx-hotfolder demo",
    "bash scripts/check.sh",
)
# Text files of the repository that may name documents (bench/ keeps its own).
NAMING_FILES = ("*.md", "docs/*.md", "*.toml", "*.yaml", "Dockerfile", "docker/*", "systemd/*")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
MD_NAME = re.compile(r"(?<![\w/.-])((?:\.\./)*[\w][\w./-]*\.md)\b")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def documents() -> list[Path]:
    """README.md, CHANGELOG.md and every page in docs/."""
    return [README, REPO / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


def prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks (their `#` lines are no headings)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading in a Markdown file."""
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose(path), re.MULTILINE)}


def relative_links(path: Path) -> list[str]:
    """Every link target of a Markdown file that is not a web address."""
    return [t for t in LINK.findall(prose(path)) if not re.match(r"[a-z]+:", t)]


def in_repo(target: Path) -> bool:
    """Whether ``target`` lies inside the repository."""
    return REPO in target.resolve().parents or target.resolve() == REPO


def table_rows(text: str) -> dict[str, str]:
    """First cell (a `name` in backticks) -> the whole row, of every table in ``text``."""
    return dict(re.findall(r"^\| `([^`]+)` \|(.*)$", text, re.MULTILINE))


def section(text: str, marker: str) -> str:
    """The part of ``text`` from the `## ` heading holding ``marker`` to the next one."""
    parts = re.split(r"^(?=## )", text, flags=re.MULTILINE)
    found = [part for part in parts if part.startswith("## ") and marker in part.splitlines()[0]]
    assert len(found) == 1, f"one section headed with {marker!r} expected"
    return found[0]


def test_readme_is_short() -> None:
    """README.md has at most 250 lines; the rest lives in docs/."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_readme_has_the_two_quick_start_commands() -> None:
    """The quick start's two commands stand in the README word for word, each on its line."""
    lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    for command in QUICK_START:
        assert command in lines, command


def test_readme_links_every_page_in_docs() -> None:
    """Every page in docs/ is linked from the README's 'Where next'."""
    where_next = section(README.read_text(encoding="utf-8"), "Where next")
    linked = set(LINK.findall(where_next))
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert pages - linked == set()


def test_every_relative_link_leads_to_a_file_and_heading() -> None:
    """Each relative link in README.md, CHANGELOG.md and docs/ names a file in the
    repository, and a heading of it when it has an anchor."""
    broken = []
    for doc in documents():
        for target in relative_links(doc):
            name, _, anchor = target.partition("#")
            path = (doc.parent / name).resolve() if name else doc
            if not in_repo(path) or not path.is_file():
                broken.append(f"{doc.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert broken == []


def test_no_document_names_a_file_outside_the_repository() -> None:
    """No document or configuration file names a .md file the repository does not hold,
    nor a path outside it such as ../shared."""
    outside = []
    files = {path for pattern in NAMING_FILES for path in REPO.glob(pattern) if path.is_file()}
    files |= set((REPO / "daemon").rglob("*.py"))
    assert {README, DOCS / "configuration.md", REPO / "config.example.toml"} <= files
    for path in sorted(files):
        text = path.read_text(encoding="utf-8")
        if "../shared" in text or re.search(r"(?<![\w.-])shared/", text):
            outside.append(f"{path.relative_to(REPO)}: shared/")
        for name in MD_NAME.findall(text):
            candidates = [path.parent / name, REPO / name, DOCS / name]
            if any(in_repo(c) and c.is_file() for c in candidates):
                continue
            outside.append(f"{path.relative_to(REPO)}: {name}")
    assert outside == []


def _shown(value: object) -> str | None:
    """A default as the reference writes it, or None when it is described in words."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value else None
    if isinstance(value, int | float):
        return repr(value)
    if value == ():
        return "[]"
    return None


def _check_fields(
    model: type[BaseModel], rows: dict[str, str], where: str, tables: frozenset[str] = frozenset()
) -> list[str]:
    """What is wrong with the rows of ``model``'s fields (but ``tables``, which have
    sections of their own): missing, or a wrong default."""
    wrong = []
    for name, field in model.model_fields.items():
        if name in tables:
            continue
        if name not in rows:
            wrong.append(f"{where}: {name} has no row")
            continue
        shown = None if field.is_required() else _shown(field.default)
        if shown is not None and name != "output_mode" and f"`{shown}`" not in rows[name]:
            wrong.append(f"{where}: {name} does not say its default {shown}")
    return wrong


def test_every_setting_is_in_the_configuration_reference() -> None:
    """docs/configuration.md has a row for every field of Settings and of its tables, in
    the right section and with its default, and names every removed setting."""
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    top = table_rows(text[: text.index("## `[hub]`")])
    tables = frozenset({"hub", "hooks", "budget", "rules"})
    wrong = _check_fields(Settings, top, "top level", tables)
    wrong += _check_fields(HubSettings, table_rows(section(text, "`[hub]`")), "[hub]")
    wrong += _check_fields(HookSettings, table_rows(section(text, "`[hooks]`")), "[hooks]")
    wrong += _check_fields(BudgetSettings, table_rows(section(text, "`[budget]`")), "[budget]")
    rules = table_rows(section(text, "`[[rules]]`"))
    wrong += [f"[[rules]]: {name} has no row" for name in Rule.model_fields if name not in rules]
    removed = table_rows(section(text, "Removed settings"))
    wrong += [f"removed: {name} has no row" for name in REMOVED if name not in removed]
    assert wrong == []


def test_every_emulator_knob_is_in_the_emulator_page() -> None:
    """docs/emulator.md has a row for every runtime knob of daemon/emulator/knobs.py, with
    its default."""
    rows = table_rows((DOCS / "emulator.md").read_text(encoding="utf-8"))
    wrong = []
    for group in GROUPS.values():
        for field in dataclasses.fields(group):
            value = list(field.default) if isinstance(field.default, tuple) else field.default
            default = f"`{json.dumps(value)}`"
            if field.name not in rows:
                wrong.append(f"{field.name} has no row")
            elif not rows[field.name].startswith(f" {default} |"):
                wrong.append(f"{field.name} does not say its default {default}")
    assert wrong == []


def test_the_changelog_releases_this_version() -> None:
    """CHANGELOG.md opens with the Unreleased section, then the program's version."""
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    assert releases[:2] == ["Unreleased", daemon.__version__]
    kinds = set(re.findall(r"^### (.+)$", text, re.MULTILINE))
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
