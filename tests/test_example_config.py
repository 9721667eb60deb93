"""The shipped config.example.toml documents every setting and loads as it is."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from daemon.config import HubSettings, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def documented_keys() -> tuple[set[str], set[str]]:
    text = EXAMPLE.read_text(encoding="utf-8")
    top_text, _, hub_text = text.partition("[hub]")
    pattern = re.compile(r"^#?\s?([a-z_]+) = ", re.MULTILINE)
    return set(pattern.findall(top_text)), set(pattern.findall(hub_text))


def test_example_documents_every_setting() -> None:
    """Every setting appears in the example, commented out or not."""
    top, hub = documented_keys()
    assert set(Settings.model_fields) - {"hub"} <= top
    assert set(HubSettings.model_fields) <= hub


def test_example_loads(tmp_path: Path) -> None:
    """The example is valid TOML and valid configuration."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert data["hub"]["output_format"] == "docx"
    settings = load_settings(EXAMPLE)
    assert settings.hub.base_url == "https://gw.ldxhub.io"
    assert settings.on_success == "keep"
