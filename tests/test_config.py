"""Configuration: TOML plus environment, strict keys, secrets and folder checks."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest

from daemon.config import check_folders, config_path, load_settings, resolve_api_key
from daemon.errors import ConfigError
from tests.conftest import write_config


def base(folders: dict[str, Path]) -> dict[str, str]:
    return {
        "inbox": str(folders["inbox"]),
        "outbox": str(folders["outbox"]),
        "state_db": str(folders["state"] / "state.db"),
    }


def test_toml_loads_with_defaults(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A minimal file loads and the documented defaults apply."""
    settings = load_settings(write_config(tmp_path / "c.toml", base(folders)))
    assert settings.hub.engine == "ki/ocr"
    assert settings.hub.output_format == "docx"
    assert settings.on_success == "keep"
    assert settings.max_in_flight >= 8
    assert settings.database_url.startswith("sqlite:///")


def test_env_overrides_file(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LDX_HOTFOLDER_* variables win over the file, nested with __."""
    path = write_config(tmp_path / "c.toml", base(folders), {"output_format": "docx"})
    monkeypatch.setenv("LDX_HOTFOLDER_HUB__OUTPUT_FORMAT", "xlsx")
    monkeypatch.setenv("LDX_HOTFOLDER_MAX_IN_FLIGHT", "3")
    settings = load_settings(path)
    assert settings.hub.output_format == "xlsx"
    assert settings.max_in_flight == 3


def test_unknown_key_in_file_is_named(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A misspelt key is an error that names it."""
    path = write_config(tmp_path / "c.toml", {**base(folders), "quiet_perod": 3})
    with pytest.raises(ConfigError, match="quiet_perod: unknown key"):
        load_settings(path)


def test_unknown_hub_key_is_named(tmp_path: Path, folders: dict[str, Path]) -> None:
    """Unknown keys in [hub] are named with their table."""
    path = write_config(tmp_path / "c.toml", base(folders), {"engin": "x"})
    with pytest.raises(ConfigError, match=r"hub\.engin: unknown key"):
        load_settings(path)


def test_unknown_env_variable_is_named(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LDX_HOTFOLDER_ variable that is no setting is an error, not ignored."""
    monkeypatch.setenv("LDX_HOTFOLDER_USE_POLING", "true")
    with pytest.raises(ConfigError, match="LDX_HOTFOLDER_USE_POLING"):
        load_settings(write_config(tmp_path / "c.toml", base(folders)))


def test_invalid_value_lists_allowed(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A bad output format names the key and the allowed values."""
    path = write_config(tmp_path / "c.toml", base(folders), {"output_format": "pdf"})
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "hub.output_format" in info.value.message
    assert "'docx', 'xlsx' or 'pptx'" in info.value.message


def test_bad_use_polling_is_one_clear_line(tmp_path: Path, folders: dict[str, Path]) -> None:
    """use_polling takes "auto", true or false; anything else is one message naming the choices."""
    # true and false may also be given as words; one message, not one per member of the union.
    path = write_config(tmp_path / "c.toml", {**base(folders), "use_polling": "sometimes"})
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    lines = info.value.message.splitlines()[1:]
    assert lines == ["  use_polling: should be \"auto\", true or false (got 'sometimes')"]
    for spelled, meant in (("AUTO", "auto"), ("off", False), ("yes", True), (True, True)):
        path = write_config(tmp_path / "c.toml", {**base(folders), "use_polling": spelled})
        assert load_settings(path).use_polling == meant


def test_bad_value_from_environment_names_the_variable(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad value set by an environment variable names that variable, not only the key."""
    monkeypatch.setenv("LDX_HOTFOLDER_HUB__OUTPUT_FORMAT", "odt")
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path / "c.toml", base(folders)))
    assert "hub.output_format" in info.value.message
    assert "(set by LDX_HOTFOLDER_HUB__OUTPUT_FORMAT)" in info.value.message


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    """An absent or malformed file gives a clear message."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("inbox = [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """-c wins, then LDX_HOTFOLDER_CONFIG, then /etc."""
    assert config_path(None, {}) == Path("/etc/ldx-hotfolder/config.toml")
    assert config_path(None, {"LDX_HOTFOLDER_CONFIG": "/x.toml"}) == Path("/x.toml")
    assert config_path("/y.toml", {"LDX_HOTFOLDER_CONFIG": "/x.toml"}) == Path("/y.toml")


def test_state_db_defaults_to_state_directory(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd the database goes to $STATE_DIRECTORY."""
    monkeypatch.setenv("STATE_DIRECTORY", str(folders["state"]))
    top = {"inbox": str(folders["inbox"]), "outbox": str(folders["outbox"])}
    settings = load_settings(write_config(tmp_path / "c.toml", top))
    assert settings.database_url == f"sqlite:///{folders['state'] / 'state.db'}"


def test_api_key_sources(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key comes from api_key, api_key_file or the systemd credential, in that order."""
    cred_dir = tmp_path / "creds"
    cred_dir.mkdir()
    (cred_dir / "api-key").write_text("from-credential\n", encoding="utf-8")
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(cred_dir))
    plain = load_settings(write_config(tmp_path / "a.toml", base(folders)))
    assert resolve_api_key(plain.hub) == "from-credential"
    with_file = load_settings(
        write_config(tmp_path / "b.toml", base(folders), {"api_key_file": str(key_file)})
    )
    assert resolve_api_key(with_file.hub) == "from-file"
    with_key = load_settings(write_config(tmp_path / "c.toml", base(folders), {"api_key": "k"}))
    assert resolve_api_key(with_key.hub) == "k"


def test_api_key_missing_or_empty(tmp_path: Path, folders: dict[str, Path]) -> None:
    """No key, or an empty key file, is a configuration error that says what to set."""
    settings = load_settings(write_config(tmp_path / "a.toml", base(folders)))
    with pytest.raises(ConfigError, match="no API key"):
        resolve_api_key(settings.hub)
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    settings = load_settings(
        write_config(tmp_path / "b.toml", base(folders), {"api_key_file": str(empty)})
    )
    with pytest.raises(ConfigError, match="is empty"):
        resolve_api_key(settings.hub)


def test_secret_not_in_repr(tmp_path: Path, folders: dict[str, Path]) -> None:
    """The key never shows in the settings' repr."""
    path = write_config(tmp_path / "a.toml", base(folders), {"api_key": "CANARY-123"})
    assert "CANARY-123" not in repr(load_settings(path))


def test_folder_checks(tmp_path: Path, folders: dict[str, Path]) -> None:
    """Missing inbox and nested folders are reported."""
    missing = {**base(folders), "inbox": str(tmp_path / "nope")}
    problems = check_folders(load_settings(write_config(tmp_path / "a.toml", missing)))
    assert any("does not exist" in p for p in problems)
    nested = {**base(folders), "outbox": str(folders["inbox"] / "out")}
    problems = check_folders(load_settings(write_config(tmp_path / "b.toml", nested)))
    assert any("inside the inbox" in p for p in problems)
    assert check_folders(load_settings(write_config(tmp_path / "c.toml", base(folders)))) == []


def test_state_files_inside_the_inbox_are_refused(tmp_path: Path, folders: dict[str, Path]) -> None:
    """The database or the health socket inside the inbox would be taken as inputs: refused."""
    in_inbox = {**base(folders), "state_db": str(folders["inbox"] / "db" / "state.db")}
    problems = check_folders(load_settings(write_config(tmp_path / "a.toml", in_inbox)))
    assert problems == [
        f"state_db {folders['inbox'] / 'db' / 'state.db'} is inside the inbox "
        f"{folders['inbox']}; it would be taken as an input"
    ]
    beat = {**base(folders), "health_socket": str(folders["inbox"] / "health.sock")}
    problems = check_folders(load_settings(write_config(tmp_path / "b.toml", beat)))
    assert [p.split(" ", 1)[0] for p in problems] == ["health_socket"]


def test_state_files_inside_the_outbox_are_refused(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """People read the outbox: the state database may not sit in it (nor in archive_dir)."""
    in_outbox = {**base(folders), "state_db": str(folders["outbox"] / "state.db")}
    problems = check_folders(load_settings(write_config(tmp_path / "a.toml", in_outbox)))
    assert problems == [
        f"state_db {folders['outbox'] / 'state.db'} is inside the outbox {folders['outbox']}; "
        "keep the daemon's state apart"
    ]
    archive = tmp_path / "archive"
    in_archive = {
        **base(folders),
        "archive_dir": str(archive),
        "state_db": str(archive / "db" / "state.db"),
    }
    problems = check_folders(load_settings(write_config(tmp_path / "b.toml", in_archive)))
    assert [p.split(" is inside ")[1].split(" ")[0] for p in problems] == ["archive_dir"]


def test_heartbeat_file_is_a_removed_setting(tmp_path: Path, folders: dict[str, Path]) -> None:
    """The heartbeat file is gone: the setting is ignored with a note, never refused."""
    config = {**base(folders), "heartbeat_file": str(folders["state"] / "beat.json")}
    settings = load_settings(write_config(tmp_path / "a.toml", config))
    assert any("heartbeat_file was removed" in note for note in settings.notes)
    assert settings.health_socket_path == folders["state"] / "health.sock"


def test_archive_requires_folder(tmp_path: Path, folders: dict[str, Path]) -> None:
    """on_success = archive without archive_dir is refused."""
    path = write_config(tmp_path / "a.toml", {**base(folders), "on_success": "archive"})
    with pytest.raises(ConfigError, match="archive_dir"):
        load_settings(path)


def with_text(path: Path, text: str) -> Path:
    """Append TOML text (tables such as [[rules]]) to a written configuration file."""
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")
    return path


def error_lines(path: Path) -> list[str]:
    """The lines of the configuration error that loading ``path`` raises, header left out."""
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.message.splitlines()[1:]


def test_file_keys_in_another_case_are_unknown(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A file key that is a setting in another case is an unknown key, never silently dropped."""
    twin = write_config(tmp_path / "a.toml", {**base(folders), "Inbox": "/c"})
    assert error_lines(twin) == [
        "  Inbox: unknown key (not a setting of ldx-hotfolder; did you mean inbox?)"
    ]
    alone = {"Inbox": "/c", "outbox": str(folders["outbox"]), "MAX_IN_FLIGHT": 3}
    assert error_lines(write_config(tmp_path / "b.toml", alone)) == [
        "  Inbox: unknown key (not a setting of ldx-hotfolder; did you mean inbox?)",
        "  MAX_IN_FLIGHT: unknown key (not a setting of ldx-hotfolder; "
        "did you mean max_in_flight?)",
        "  inbox: required but not set",
    ]


def test_table_keys_in_another_case_are_unknown(tmp_path: Path, folders: dict[str, Path]) -> None:
    """Keys of [hub], [hooks] and [[rules]] in another case are unknown keys with a hint."""
    path = write_config(tmp_path / "a.toml", base(folders), {"Engine": "ki/ocr"})
    path = with_text(
        path, '\n[hooks]\nTimeout = 3\n\n[[rules]]\nmatch = "a/**"\nLanguage = "eng"\n'
    )
    assert error_lines(path) == [
        "  hub.Engine: unknown key (not a setting of ldx-hotfolder; did you mean engine?)",
        "  hooks.Timeout: unknown key (not a setting of ldx-hotfolder; did you mean timeout?)",
        "  rules[1].Language: unknown key (not a setting of ldx-hotfolder; did you mean language?)",
    ]
    table = with_text(write_config(tmp_path / "b.toml", base(folders)), '\n[HUB]\nengine = "x"\n')
    assert error_lines(table) == [
        "  HUB: unknown key (not a setting of ldx-hotfolder; did you mean hub?)"
    ]


def test_environment_names_stay_case_insensitive(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An environment variable in any case still sets its setting."""
    monkeypatch.setenv("ldx_hotfolder_Max_In_Flight", "3")
    monkeypatch.setenv("LDX_HOTFOLDER_hub__Language", "eng")
    settings = load_settings(write_config(tmp_path / "a.toml", base(folders)))
    assert (settings.max_in_flight, settings.hub.language) == (3, "eng")


def test_archive_rule_requires_folder(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A rule with on_success = archive and no archive_dir is refused, naming the rule."""
    rules = '\n[[rules]]\nmatch = "a/**"\n\n[[rules]]\nmatch = "b/**"\non_success = "archive"\n'
    path = with_text(write_config(tmp_path / "a.toml", base(folders)), rules)
    assert error_lines(path) == [
        "  (top level): rules[2] (match 'b/**'): on_success = 'archive' needs archive_dir to be set"
    ]
    archive = {**base(folders), "archive_dir": str(tmp_path / "archive")}
    allowed = with_text(write_config(tmp_path / "b.toml", archive), rules)
    assert load_settings(allowed).rules[1].on_success == "archive"


@pytest.mark.parametrize(
    ("top", "rule", "checked"),
    [
        ("keep", "keep", False),
        ("delete", "keep", True),
        ("archive", "keep", True),
        ("keep", "delete", True),
        ("keep", "archive", True),
    ],
)
def test_inbox_must_be_writable_when_inputs_leave_it(
    tmp_path: Path, folders: dict[str, Path], top: str, rule: str, checked: bool
) -> None:
    """check wants a writable inbox when the top level or a rule deletes or archives inputs."""
    # Root may write anywhere, so a file in the inbox's place shows whether it is checked.
    inbox = tmp_path / "inbox-file"
    inbox.write_bytes(b"")
    top_keys = {**base(folders), "inbox": str(inbox), "on_success": top}
    top_keys["archive_dir"] = str(tmp_path / "archive")
    path = write_config(tmp_path / "a.toml", top_keys)
    path = with_text(path, f'\n[[rules]]\nmatch = "a/**"\non_success = "{rule}"\n')
    problems = check_folders(load_settings(path))
    assert f"inbox {inbox} does not exist or is not a folder" in problems
    assert (f"inbox {inbox} is not a folder" in problems) is checked


def test_archive_and_outbox_must_not_be_nested(tmp_path: Path, folders: dict[str, Path]) -> None:
    """check refuses archive_dir in the outbox, the outbox in archive_dir, or the two as one."""
    outbox = folders["outbox"]
    cases = {
        outbox / "archive": f"archive_dir {outbox / 'archive'} is inside the outbox {outbox}; "
        "archived inputs would mix with the outputs",
        tmp_path: f"the outbox {outbox} is inside archive_dir {tmp_path}; they must not be nested",
        outbox: f"archive_dir {outbox} is the outbox itself; they must be separate folders",
    }
    for archive, message in cases.items():
        path = write_config(tmp_path / "a.toml", {**base(folders), "archive_dir": str(archive)})
        problems = check_folders(load_settings(path))
        assert message in problems
    apart = {**base(folders), "archive_dir": str(tmp_path / "archive")}
    assert check_folders(load_settings(write_config(tmp_path / "b.toml", apart))) == []


def key_settings(tmp_path: Path, folders: dict[str, Path], content: bytes) -> Path:
    """A configuration whose key file holds ``content``; the key file's path."""
    key_file = tmp_path / "api-key"
    key_file.write_bytes(content)
    write_config(tmp_path / "k.toml", base(folders), {"api_key_file": str(key_file)})
    return key_file


CANARY = "CANARY0123456789abcdef"


@pytest.mark.parametrize(
    "content",
    [
        CANARY.encode("utf-16"),  # with a BOM, as Notepad saves "Unicode"
        CANARY.encode("utf-16-le"),  # without one
        b"\xff" + CANARY.encode() + b"\xfe",
        CANARY.encode("latin-1") + b"\xe9",
    ],
    ids=["utf-16", "utf-16-le", "binary", "latin-1"],
)
def test_a_key_file_that_is_not_utf8_is_a_clear_error(
    tmp_path: Path, folders: dict[str, Path], content: bytes
) -> None:
    """A UTF-16 or otherwise undecodable key file: one message naming the file, never the key."""
    key_file = key_settings(tmp_path, folders, content)
    settings = load_settings(tmp_path / "k.toml")
    with pytest.raises(ConfigError) as caught:
        resolve_api_key(settings.hub)
    message = caught.value.message
    assert str(key_file) in message
    assert "UTF-" in message
    shown = "".join(traceback.format_exception(caught.value))  # what a log would render
    for text in (shown, shown.replace("\\x00", "")):
        assert "CANARY" not in text
        assert "0123456789" not in text


def test_a_key_file_is_read_as_utf8_without_bom_or_whitespace(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """A UTF-8 BOM, CRLF and blank lines around the key are not part of it."""
    key_settings(tmp_path, folders, b"\xef\xbb\xbf  " + CANARY.encode() + b"\r\n\r\n")
    assert resolve_api_key(load_settings(tmp_path / "k.toml").hub) == CANARY


def test_a_key_file_that_is_no_file_is_refused(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A FIFO or a device as the key file is refused at once (never read, never waited on)."""
    key_file = key_settings(tmp_path, folders, b"")
    key_file.unlink()
    os.mkfifo(key_file)
    settings = load_settings(tmp_path / "k.toml")
    with pytest.raises(ConfigError, match="is not a regular file"):
        resolve_api_key(settings.hub)
    key_file.unlink()
    key_file.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="is not a regular file"):
        resolve_api_key(settings.hub)


def test_a_missing_key_file_is_named(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A configured key file that does not exist is named as such, not reported as unset."""
    key_file = key_settings(tmp_path, folders, b"x")
    key_file.unlink()
    with pytest.raises(ConfigError) as caught:
        resolve_api_key(load_settings(tmp_path / "k.toml").hub)
    assert caught.value.message == (
        f"no API key: the API key file {key_file} (hub.api_key_file) does not exist"
    )


def test_an_empty_key_from_the_environment_is_refused(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LDX_HOTFOLDER_HUB__API_KEY set but empty is an error naming the variable."""
    monkeypatch.setenv("LDX_HOTFOLDER_HUB__API_KEY", "  ")
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path / "a.toml", base(folders)))
    assert "hub.api_key: is empty" in caught.value.message
    assert "LDX_HOTFOLDER_HUB__API_KEY" in caught.value.message


def test_a_wrong_key_value_is_never_quoted(tmp_path: Path, folders: dict[str, Path]) -> None:
    """However the key setting is wrong, the error does not repeat its value."""
    (tmp_path / "a.toml").write_text(
        f'inbox = "{folders["inbox"]}"\noutbox = "{folders["outbox"]}"\n'
        f'[hub]\napi_key = ["{CANARY}"]\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "a.toml")
    assert "hub.api_key" in caught.value.message
    assert CANARY not in caught.value.message


def test_list_settings_from_the_environment(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ignore takes JSON or a comma list; other lists not in JSON are one clear error."""
    config = write_config(tmp_path / "a.toml", base(folders))
    monkeypatch.setenv("LDX_HOTFOLDER_IGNORE", "*.bak, ~$*")
    assert load_settings(config).ignore == ("*.bak", "~$*")
    monkeypatch.setenv("LDX_HOTFOLDER_IGNORE", '["*.tmp"]')
    assert load_settings(config).ignore == ("*.tmp",)
    monkeypatch.setenv("LDX_HOTFOLDER_HOOKS__ON_FAILED", "/usr/local/bin/notify --to a,b")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "LDX_HOTFOLDER_HOOKS" in caught.value.message
    assert "not valid JSON" in caught.value.message
    monkeypatch.setenv("LDX_HOTFOLDER_HOOKS__ON_FAILED", '["/usr/local/bin/notify", "a,b"]')
    assert load_settings(config).hooks.on_failed == ("/usr/local/bin/notify", "a,b")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("stall_timeout", "inf", "finite"),
        ("quiet_period", "nan", "finite"),
        ("max_output_mb", "inf", "finite"),
        ("heartbeat_interval", "1e-6", "greater than or equal to 0.1"),
        ("rescan_interval", "0.001", "greater than or equal to 0.5"),
        ("polling_interval", "1e-9", "greater than or equal to 0.1"),
        ("auth_recheck_interval", "0.0001", "greater than or equal to 0.1"),
        ("output_mode", "0777", "group or others"),
        ("output_mode", "0660", "group or others"),
        ("hub__deadline", "inf", "finite"),
        ("hooks__timeout", "nan", "finite"),
    ],
)
def test_numbers_must_be_finite_and_intervals_sensible(
    tmp_path: Path,
    folders: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    value: str,
    words: str,
) -> None:
    """inf, nan, a microsecond interval and group-writable outputs are refused, by name."""
    monkeypatch.setenv(f"LDX_HOTFOLDER_{key.upper()}", value)
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path / "a.toml", base(folders)))
    assert key.replace("__", ".") in caught.value.message
    assert words in caught.value.message


def test_an_unreadable_configuration_file_is_a_clear_error(tmp_path: Path) -> None:
    """A configuration file that is a folder, or not UTF-8, is one message, no traceback."""
    folder = tmp_path / "config.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="cannot be read: Is a directory"):
        load_settings(folder)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'inbox = "/srv/b\xe9"\n')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_settings(latin)
