"""The shipped config.example.toml documents every setting and loads as it is."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from daemon.config import HookSettings, HubSettings, Settings, load_settings
from daemon.rules import Rule

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def documented_keys() -> dict[str, set[str]]:
    """Keys per table ("" for the top level), commented-out examples included."""
    text = EXAMPLE.read_text(encoding="utf-8")
    pattern = re.compile(r"^#?\s?([a-z_]+) = ", re.MULTILINE)
    parts = re.split(r"^#?\s?\[\[?([a-z]+)\]\]?\s*$", text, flags=re.MULTILINE)
    keys: dict[str, set[str]] = {"": set(pattern.findall(parts[0]))}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        keys.setdefault(name, set()).update(pattern.findall(body))
    return keys


def test_example_documents_every_setting() -> None:
    """Every setting appears in the example, commented out or not, in its table."""
    keys = documented_keys()
    assert set(Settings.model_fields) - {"hub", "hooks", "rules"} <= keys[""]
    assert set(HubSettings.model_fields) <= keys["hub"]
    assert set(HookSettings.model_fields) <= keys["hooks"]
    assert {"match"} | {name for name in Rule.model_fields if name != "match"} <= keys["rules"]


def test_example_loads(tmp_path: Path) -> None:
    """The example is valid TOML and valid configuration."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert data["hub"]["output_format"] == "docx"
    settings = load_settings(EXAMPLE)
    assert settings.hub.base_url == "https://gw.ldxhub.io"
    assert settings.on_success == "keep"
