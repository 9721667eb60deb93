"""Shared fixtures: folders, configuration files and a clean environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

_SYSTEMD_VARS = ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see the developer's LDX_HOTFOLDER_* or systemd variables."""
    for name in list(os.environ):
        if name.startswith("LDX_HOTFOLDER_") or name in (
            "CREDENTIALS_DIRECTORY",
            "STATE_DIRECTORY",
        ):
            monkeypatch.delenv(name)
    yield


def toml_value(value: Any) -> str:
    """Render a Python value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, top: dict[str, Any], hub: dict[str, Any] | None = None) -> Path:
    """Write a config.toml with the given top-level keys and [hub] table."""
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    if hub:
        lines.append("\n[hub]")
        lines += [f"{key} = {toml_value(value)}" for key, value in hub.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """An inbox, an outbox and a state folder under tmp_path."""
    made = {name: tmp_path / name for name in ("inbox", "outbox", "state")}
    for folder in made.values():
        folder.mkdir()
    return made
