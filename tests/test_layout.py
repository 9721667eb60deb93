"""The package layout as rules, read from the source with ``ast``: module count, class size,
the direction of imports between stages, no import cycles, and where HTTP and SQL live.

Every import counts, also one inside a function or under ``TYPE_CHECKING``: a dependency
is a dependency, however late it is loaded.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

# -- the layout, as data -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1] / "daemon"

MAX_TOP_MODULES = 12  # *.py files directly in daemon/, __init__ and __main__ included
MAX_CLASS_LINES = 400

# The stages, top to bottom (a unit is a package of daemon/, or one of its top modules;
# "__init__" is daemon/__init__.py). A unit imports its own modules and the stages below
# its own, never one above or beside it.
STAGES: tuple[tuple[str, ...], ...] = (
    ("__main__",),  # python -m daemon
    ("cli",),
    ("demo",),
    ("service",),  # the composition root
    ("pipeline",),
    ("ops",),
    ("hub", "inbox"),
    ("outbox",),
    ("config", "jobs", "fs", "formats"),
    ("logs", "errors", "__init__"),
)
# Units beside the stages: the only units of daemon/ each may import.
SIDE_IMPORTS: dict[str, frozenset[str]] = {
    "emulator": frozenset({"formats"}),
}
# Units only the named units may import.
IMPORTED_ONLY_BY: dict[str, frozenset[str]] = {
    "service": frozenset({"cli", "demo"}),
    "cli": frozenset({"__main__"}),  # the entry point of python -m daemon, and nothing else
    "emulator": frozenset({"cli", "demo"}),
}
# Third-party packages confined to a few modules (paths relative to daemon/).
# The emulator is a test double: in process (no socket) it raises the error an httpx
# client would see (a cut connection, a read timeout).
HTTPX_MODULES = frozenset(
    {"hub/client.py", "pipeline/hooks.py", "emulator/middleware.py", "emulator/streams.py"}
)
NEVER_IMPORTED = frozenset({"httpcore"})
SQL_FREE_UNITS = {"pipeline": "sqlalchemy"}

# Known breaches, each waiting for its own fix: (check, unit) -> the offender. The check of
# that unit is expected to fail; strict, so a fixed breach fails until its entry goes.
KNOWN_BREACHES: dict[tuple[str, str], str] = {
    ("class size", "pipeline"): "pipeline/steps.py: class Steps passes 400 lines",
    ("class size", "inbox"): "inbox/intake.py: class Intake passes 400 lines",
    ("stages", "outbox"): (
        "outbox/duplicates.py imports inbox.inputs and outbox/publish.py imports "
        "inbox.stability: outbox sits below inbox"
    ),
}


# -- reading the package -------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from the module that makes it."""

    importer: str  # dotted module name, e.g. "daemon.hub.client"
    target: str  # a module of daemon/, or the top-level name of an outside package
    internal: bool
    line: int


def module_name(path: Path) -> str:
    """The dotted name of a module file under daemon/."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of daemon/, by dotted name."""
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


@cache
def tree(name: str) -> ast.Module:
    """The parsed source of one module."""
    return ast.parse(modules()[name].read_text(encoding="utf-8"))


def unit_of(module: str) -> str:
    """The package of daemon/ a module belongs to, or its own name if it is a top module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def relative(module: str) -> str:
    """A module's path relative to daemon/, e.g. "hub/client.py"."""
    return modules()[module].relative_to(ROOT).as_posix()


def _dotted_names(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".")
        if modules()[module].name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    for alias in node.names:
        yield f"{base}.{alias.name}"  # a submodule, or a name defined in ``base``


def _resolve(importer: str, dotted: str, line: int) -> Import:
    top = dotted.split(".", maxsplit=1)[0]
    if top != "daemon":
        return Import(importer, top, internal=False, line=line)
    name = dotted
    while name not in modules():
        name = name.rsplit(".", 1)[0]
    return Import(importer, name, internal=True, line=line)


@cache
def imports() -> tuple[Import, ...]:
    """Every import in daemon/, lazy and TYPE_CHECKING ones included."""
    found: list[Import] = []
    for module in modules():
        for node in ast.walk(tree(module)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for dotted in _dotted_names(module, node):
                    found.append(_resolve(module, dotted, node.lineno))
    return tuple(found)


def internal_edges() -> set[tuple[str, str]]:
    """(importer, imported) pairs of modules of daemon/, without self-imports."""
    return {(i.importer, i.target) for i in imports() if i.internal and i.importer != i.target}


def units() -> list[str]:
    """Every unit of daemon/, sorted."""
    return sorted({unit_of(module) for module in modules()})


def per_unit(check: str, chosen: list[str]) -> list[object]:
    """Parameters for ``check`` over ``chosen`` units, a known breach marked strict xfail."""
    return [
        pytest.param(
            unit,
            marks=pytest.mark.xfail(strict=True, reason=KNOWN_BREACHES[(check, unit)]),
        )
        if (check, unit) in KNOWN_BREACHES
        else unit
        for unit in chosen
    ]


def stage_of(unit: str) -> int | None:
    """The position of a unit's stage, top first; None for a unit beside the stages."""
    for index, stage in enumerate(STAGES):
        if unit in stage:
            return index
    return None


def staged_units() -> list[str]:
    """The units that sit in a stage, in the order of the stages."""
    return [unit for stage in STAGES for unit in stage]


def find_cycle(edges: set[tuple[str, str]]) -> list[str]:
    """One import cycle as a path of modules (its first module again at its end), or []."""
    graph: dict[str, list[str]] = {}
    for source, target in sorted(edges):
        graph.setdefault(source, []).append(target)
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        path.append(node)
        for target in graph.get(node, []):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        found = visit(node)
        if found:
            return found
    return []


# -- the checker sees the package ----------------------------------------------------------


def test_the_checker_sees_known_imports_and_units() -> None:
    """The import reader finds imports known to exist, and every unit has a place."""
    edges = internal_edges()
    assert ("daemon.__main__", "daemon.cli") in edges
    assert ("daemon.service", "daemon.pipeline.worker") in edges
    assert ("daemon.cli", "daemon.emulator.cli") in edges  # a lazy import
    assert ("daemon.cli", "daemon") in edges  # from daemon import __version__
    outside = {(i.importer, i.target) for i in imports() if not i.internal}
    assert ("daemon.hub.client", "httpx") in outside
    placed = set(staged_units()) | set(SIDE_IMPORTS)
    assert sorted(placed) == units(), "each unit in a stage or beside them, once"


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The cycle finder reports a three-module loop and finds none in a chain."""
    loop = {("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}
    assert find_cycle(loop) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"), ("b", "c"), ("a", "c")}) == []


# -- (1) module count ----------------------------------------------------------------------


def test_daemon_holds_at_most_twelve_top_modules() -> None:
    """At most MAX_TOP_MODULES modules sit directly in daemon/; the rest live in packages."""
    top = sorted(path.name for path in ROOT.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


# -- (2) class size ------------------------------------------------------------------------


@pytest.mark.parametrize("unit", per_unit("class size", units()))
def test_no_class_passes_the_line_limit(unit: str) -> None:
    """No class in the unit spans more than MAX_CLASS_LINES lines."""
    too_long = [
        f"{relative(module)}: class {node.name} is {node.end_lineno - node.lineno + 1} lines"
        for module in modules()
        if unit_of(module) == unit
        for node in ast.walk(tree(module))
        if isinstance(node, ast.ClassDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]
    assert too_long == []


# -- (3) dependency direction --------------------------------------------------------------


@pytest.mark.parametrize("unit", per_unit("stages", staged_units()))
def test_each_stage_imports_only_the_stages_below_it(unit: str) -> None:
    """A staged unit imports only its own modules and units of lower stages."""
    own = stage_of(unit)
    assert own is not None
    wrong = []
    for importer, target in sorted(internal_edges()):
        if unit_of(importer) != unit or unit_of(target) == unit:
            continue
        stage = stage_of(unit_of(target))  # None: a side unit, guarded by its importers
        if stage is not None and stage <= own:
            wrong.append(f"{relative(importer)} imports {target}")
    assert wrong == []


@pytest.mark.parametrize("unit", per_unit("side imports", sorted(SIDE_IMPORTS)))
def test_side_units_import_only_what_they_may(unit: str) -> None:
    """A unit beside the stages imports only the units SIDE_IMPORTS names for it."""
    wrong = [
        f"{relative(importer)} imports {target}"
        for importer, target in sorted(internal_edges())
        if unit_of(importer) == unit
        and unit_of(target) != unit
        and unit_of(target) not in SIDE_IMPORTS[unit]
    ]
    assert wrong == []


@pytest.mark.parametrize("unit", per_unit("importers", sorted(IMPORTED_ONLY_BY)))
def test_only_the_named_units_import_a_guarded_unit(unit: str) -> None:
    """service, cli and the emulator are imported only by the units IMPORTED_ONLY_BY names."""
    wrong = [
        f"{relative(importer)} imports {target}"
        for importer, target in sorted(internal_edges())
        if unit_of(target) == unit
        and unit_of(importer) != unit
        and unit_of(importer) not in IMPORTED_ONLY_BY[unit]
    ]
    assert wrong == []


# -- (4) cycles ----------------------------------------------------------------------------


def test_no_import_cycles_between_modules() -> None:
    """No module of daemon/ reaches itself through the imports of others."""
    assert find_cycle(internal_edges()) == []


# -- (5) HTTP and SQL ----------------------------------------------------------------------


@pytest.mark.parametrize("unit", per_unit("httpx", units()))
def test_only_the_hub_client_and_the_hooks_import_httpx(unit: str) -> None:
    """No module of the unit imports httpx, but hub/client.py and pipeline/hooks.py."""
    wrong = sorted(
        {
            relative(i.importer)
            for i in imports()
            if not i.internal
            and i.target == "httpx"
            and unit_of(i.importer) == unit
            and relative(i.importer) not in HTTPX_MODULES
        }
    )
    assert wrong == []


def test_nothing_imports_httpcore() -> None:
    """No module of daemon/ imports httpcore (httpx's internals)."""
    wrong = sorted(
        f"{relative(i.importer)} imports {i.target}"
        for i in imports()
        if not i.internal and i.target in NEVER_IMPORTED
    )
    assert wrong == []


def test_the_pipeline_does_not_import_sqlalchemy() -> None:
    """No module of daemon/pipeline/ imports sqlalchemy: the jobs package owns the SQL."""
    wrong = sorted(
        f"{relative(i.importer)} imports {i.target}"
        for i in imports()
        if not i.internal
        and unit_of(i.importer) in SQL_FREE_UNITS
        and i.target == SQL_FREE_UNITS[unit_of(i.importer)]
    )
    assert wrong == []
