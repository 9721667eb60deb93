"""The shipped config.example.toml documents every setting and loads as it is."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pydantic import BaseModel

from daemon.config import BudgetSettings, HookSettings, HubSettings, Rule, Settings, load_settings

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
    assert set(Settings.model_fields) - {"hub", "hooks", "budget", "rules"} <= keys[""]
    assert set(HubSettings.model_fields) <= keys["hub"]
    assert set(HookSettings.model_fields) <= keys["hooks"]
    assert set(BudgetSettings.model_fields) <= keys["budget"]
    assert {"match"} | {name for name in Rule.model_fields if name != "match"} <= keys["rules"]


def test_example_loads(tmp_path: Path) -> None:
    """The example is valid TOML and valid configuration."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert data["hub"]["output_format"] == "docx"
    settings = load_settings(EXAMPLE)
    assert settings.hub.base_url == "https://gw.ldxhub.io"
    assert settings.on_success == "keep"


# Uncommented values that are examples, not defaults; the example says so beside each.
NOT_DEFAULTS = {"inbox", "outbox", "state_db", "hub.api_key_file"}


def differs(model: type[BaseModel], key: str, value: object) -> bool:
    """Whether ``value`` is not the default of ``model``'s field ``key`` (TOML lists as tuples)."""
    field = model.model_fields[key]
    if field.is_required():
        return True
    default = field.get_default(call_default_factory=False)
    return (list(default) if isinstance(default, tuple) else default) != value


def test_example_values_are_the_defaults() -> None:
    """Every value the example sets is the code's default, but for the marked examples."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    tables = [("", Settings, data), ("hub.", HubSettings, data["hub"])]
    tables.append(("hooks.", HookSettings, data["hooks"]))
    differ = {
        prefix + key
        for prefix, model, values in tables
        for key, value in values.items()
        if not isinstance(value, dict) and differs(model, key, value)
    }
    assert differ == NOT_DEFAULTS
