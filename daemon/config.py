"""Configuration: one TOML file plus ``LDX_HOTFOLDER_*`` variables, read once into ``Settings``.

This is the only module that reads the process environment. Every other module gets
the typed ``Settings`` object (or a part of it) passed in. Unknown keys, in the file
or in the environment, are errors that name the key: a misspelt option must never be
silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from daemon.errors import ConfigError
from daemon.logs import register_secret

ENV_PREFIX = "LDX_HOTFOLDER_"
CONFIG_ENV = "LDX_HOTFOLDER_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/ldx-hotfolder/config.toml")
DEFAULT_STATE_DIR = Path("/var/lib/ldx-hotfolder")
CREDENTIAL_NAME = "api-key"
# Variables with our prefix that are not settings (so the unknown-key check skips them).
_RESERVED_ENV = {CONFIG_ENV, "LDX_HOTFOLDER_FAILPOINT"}

# How TOML or an environment variable may spell true and false where "auto" is allowed.
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True}
_BOOL_WORDS |= {"false": False, "no": False, "off": False, "0": False}
INSTANCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_ARCHIVE_NEEDS_DIR = "on_success = 'archive' needs archive_dir to be set"
# Settings of earlier versions that are gone: a warning naming them, never a refusal
# (an upgrade must not stop a daemon that still has one in its configuration).
REMOVED = {
    "transfer_process": "the daemon is one process now; delete the line",
}
_REMOVED_ENV = {ENV_PREFIX + key.upper() for key in REMOVED}


class RouteFields(BaseModel):
    """The fields a rule or a folder file may set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_format: Literal["docx", "xlsx", "pptx"] | None = None
    language: str | None = None
    engine: str | None = None
    on_success: Literal["keep", "delete", "archive"] | None = None

    def given(self) -> dict[str, str]:
        """The fields this source sets."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Rule(RouteFields):
    """One ``[[rules]]`` entry: a glob on the relative path and the fields it sets."""

    match: str


def parse_mode(value: object) -> int:
    """A file mode from ``0o640``, ``416``, ``"0640"``, ``"640"`` or ``"0o640"``."""
    if isinstance(value, bool):
        raise ValueError('a file mode is a number such as 0o640 or the string "0640"')
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        try:
            mode = int(text, 8)
        except ValueError:
            raise ValueError(f'not an octal file mode: {value!r} (try "0640")') from None
    else:
        raise ValueError(f"not a file mode: {value!r}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"file mode {mode:#o} is out of range (0 to 0o777, no special bits)")
    if not mode & stat.S_IRUSR:
        raise ValueError(f"file mode {mode:#o} would hide outputs from the daemon itself")
    return mode


def default_instance_id() -> str:
    """The host name, made a valid instance id: stable across restarts of one daemon,
    different between machines and containers."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")[:100]
    return name or "ldx-hotfolder"


OutputFormat = Literal["docx", "xlsx", "pptx"]
OnSuccess = Literal["keep", "delete", "archive"]
OnDuplicate = Literal["convert", "reuse", "skip"]


class HubSettings(BaseModel):
    """Where the LDX hub is and how to convert with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = "https://gw.ldxhub.io"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    engine: str = "ki/ocr"
    language: str = "jpn"
    output_format: OutputFormat = "docx"
    timeout: float = Field(default=60.0, gt=0, description="seconds without progress on a request")
    deadline: float = Field(default=120.0, gt=0, description="seconds one request may take")
    min_transfer_rate: float = Field(default=50_000.0, gt=0, description="bytes/s of a transfer")
    poll_wait: int = Field(default=10, ge=0, le=10, description="longest long poll; 0: none")
    poll_interval: float = Field(
        default=2.0, ge=1.0, le=5.0, description="first wait before polling a job again"
    )
    max_requests_per_minute: float = Field(
        default=100.0, ge=0, description="hub requests a minute, all jobs together; 0: no limit"
    )

    @model_validator(mode="after")
    def _strip_base_url(self) -> HubSettings:
        # The vendor's clients strip trailing slashes; a doubled slash would 404 at the gateway.
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        return self


class HookSettings(BaseModel):
    """Commands and a webhook told when a job completes or fails."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    on_completed: tuple[str, ...] = ()
    on_failed: tuple[str, ...] = ()
    timeout: float = Field(default=30.0, gt=0, description="seconds before a hook is killed")
    webhook_url: str | None = None
    webhook_attempts: int = Field(default=5, ge=1)


class BudgetSettings(BaseModel):
    """Pages the hub may bill a day and a month (UTC); past them new conversions wait."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pages_per_day: int | None = Field(default=None, gt=0, description="None: no daily limit")
    pages_per_month: int | None = Field(default=None, gt=0, description="None: no monthly limit")


class Settings(BaseSettings):
    """Every setting of the daemon, typed and validated."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    inbox: Path
    outbox: Path
    state_db: str = ""
    instance_id: str = Field(
        default_factory=default_instance_id,
        pattern=INSTANCE_ID_PATTERN,
        description="this daemon's name among those sharing the state database",
    )
    lease_seconds: float = Field(
        default=30.0, ge=1.0, le=3600.0, description="a claimed job's lease, renewed while held"
    )
    archive_dir: Path | None = None
    on_success: OnSuccess = "keep"
    quiet_period: float = Field(default=2.0, ge=0.0, description="seconds a file must not change")
    rescan_interval: float = Field(default=300.0, gt=0, description="seconds between full rescans")
    stalled_after: float = Field(default=300.0, gt=0, description="waiting this long shows")
    incomplete_timeout: float = Field(default=3600.0, ge=0, description="then an incomplete fails")
    use_polling: Literal["auto"] | bool = "auto"
    polling_interval: float = Field(default=2.0, gt=0, description="seconds between polls")
    allow_hardlinks: bool = False
    on_duplicate: OnDuplicate = "reuse"
    max_in_flight: int = Field(default=16, ge=1, le=1000)
    max_attempts: int = Field(
        default=8, ge=1, description="retries of one step for a cause that may not pass"
    )
    max_conversions: int = Field(
        default=2, ge=1, le=100, description="paid conversions of one input without a retry"
    )
    job_deadline: float = Field(
        default=6 * 3600.0, gt=0, allow_inf_nan=False, description="seconds a hub job may run"
    )
    max_output_mb: float = Field(
        default=2000.0, gt=0, allow_inf_nan=False, description="no output may be larger"
    )
    ignore: tuple[str, ...] = ()
    auto_retry_after: float = Field(default=1800.0, ge=0, description="0 turns it off")
    auto_retry_limit: int = Field(default=3, ge=0)
    resubmit_delay: float = Field(default=20.0, ge=0, description="first wait before resubmit")
    min_free_space_mb: float = Field(default=100.0, ge=0)
    auth_recheck_interval: float = Field(
        default=30.0, gt=0, le=30.0, description="most seconds between probes of a held hub"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    output_mode: int = Field(default=0o640, description="mode of outputs, whatever the umask")
    output_group: str | None = Field(default=None, description="group (name or gid) of outputs")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 turns the endpoint off")
    metrics_host: str = "127.0.0.1"
    heartbeat_file: Path | None = None
    heartbeat_interval: float = Field(default=5.0, gt=0, description="seconds between checks")
    stall_timeout: float = Field(default=60.0, gt=0, description="seconds unhealthy before exit")
    hub: HubSettings = HubSettings()
    hooks: HookSettings = HookSettings()
    budget: BudgetSettings = BudgetSettings()
    rules: tuple[Rule, ...] = ()
    _notes: tuple[str, ...] = PrivateAttr(default=())

    @property
    def notes(self) -> tuple[str, ...]:
        """Warnings about the configuration it was read from (removed settings)."""
        return self._notes

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment variables override the file, which arrives as init arguments.
        return (env_settings, init_settings)

    @field_validator("use_polling", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: object) -> object:
        # One message naming the choices, instead of pydantic's one per member of the union.
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        if word == "auto":
            return "auto"
        if word in _BOOL_WORDS:
            return _BOOL_WORDS[word]
        raise ValueError('should be "auto", true or false')

    @field_validator("output_mode", mode="before")
    @classmethod
    def _parse_mode(cls, value: object) -> int:
        return parse_mode(value)

    @model_validator(mode="after")
    def _check_health_timing(self) -> Settings:
        if self.heartbeat_interval >= self.stall_timeout:
            raise ValueError("heartbeat_interval must be shorter than stall_timeout")
        return self

    @model_validator(mode="after")
    def _check_archive(self) -> Settings:
        # Without archive_dir the worker could only keep the input: refuse, never surprise.
        if self.archive_dir is not None:
            return self
        problems = [
            f"rules[{index}] (match {rule.match!r}): {_ARCHIVE_NEEDS_DIR}"
            for index, rule in enumerate(self.rules, start=1)
            if rule.on_success == "archive"
        ]
        if self.on_success == "archive":
            problems.insert(0, _ARCHIVE_NEEDS_DIR)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the state database."""
        return database_url(self.state_db)

    @property
    def state_dir(self) -> Path:
        """The daemon's own folder: beside the SQLite database, else the state directory."""
        url = self.database_url
        if url.startswith("sqlite:///"):
            return Path(url.removeprefix("sqlite:///")).parent
        return Path(_default_state_db(os.environ)).parent

    @property
    def held_dir(self) -> Path:
        """Where outputs are kept while their folder cannot be written."""
        return self.state_dir / "held"

    @property
    def heartbeat_path(self) -> Path:
        """The heartbeat file: as set, else beside the SQLite database, else in the state dir."""
        if self.heartbeat_file is not None:
            return self.heartbeat_file.absolute()
        url = self.database_url
        if url.startswith("sqlite:///"):
            return Path(url.removeprefix("sqlite:///")).parent / "heartbeat.json"
        return DEFAULT_STATE_DIR / "heartbeat.json"


def database_url(state_db: str) -> str:
    """Turn ``state_db`` (a path or an SQLAlchemy URL) into an SQLAlchemy URL."""
    if "://" in state_db:
        return state_db
    return f"sqlite:///{Path(state_db).expanduser().absolute()}"


def config_path(cli_value: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """The configuration file: ``-c`` first, then ``LDX_HOTFOLDER_CONFIG``, then /etc."""
    env = os.environ if environ is None else environ
    if cli_value:
        return Path(cli_value)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load_settings(path: Path | None) -> Settings:
    """Read the TOML file (optional when None) and the environment into ``Settings``.

    Raises ``ConfigError`` with a message that names the offending key.
    """
    data = _read_toml(path) if path is not None else {}
    notes = _removed_keys(data, os.environ)
    env = {k: v for k, v in os.environ.items() if k.upper() not in _REMOVED_ENV}
    _reject_unknown_env(env)
    data.setdefault("state_db", _default_state_db(os.environ))
    miscased = _miscased_keys(data)
    try:
        settings = Settings(**{key: data[key] for key in data if key not in miscased})
    except ValidationError as exc:
        errors = [*miscased.values(), *exc.errors()]
        raise ConfigError(_describe_validation(errors, path, os.environ)) from None
    if miscased:
        raise ConfigError(_describe_validation(list(miscased.values()), path, os.environ))
    settings._notes = tuple(notes)
    return settings


def _removed_keys(data: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """Drop settings an earlier version had and this one no longer has; say so."""
    notes = []
    for key, why in REMOVED.items():
        variable = ENV_PREFIX + key.upper()
        if key in data or any(name.upper() == variable for name in env):
            data.pop(key, None)
            notes.append(f"the setting {key} was removed in 0.2.0 and is ignored: {why}")
    return notes


def _miscased_keys(data: Mapping[str, Any]) -> dict[str, ErrorDetails]:
    """Top-level file keys that name a setting in another case, as unknown-key errors."""
    # Settings matches names case-insensitively (for environment variables), so pydantic
    # would take "Inbox", or silently drop it for its twin "inbox". In the file, keys are
    # exact; tables are plain models, which already refuse a key in another case.
    return {
        key: ErrorDetails(
            type="extra_forbidden", loc=(key,), msg="Extra inputs are not permitted", input=value
        )
        for key, value in data.items()
        if key not in Settings.model_fields and key.lower() in Settings.model_fields
    }


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"configuration file {path} is not readable: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def _default_state_db(env: Mapping[str, str]) -> str:
    # systemd's StateDirectory= exports STATE_DIRECTORY; use it when we run as a service.
    state_dir = env.get("STATE_DIRECTORY", "").split(":")[0]
    base = Path(state_dir) if state_dir else DEFAULT_STATE_DIR
    return str(base / "state.db")


def _reject_unknown_env(env: Mapping[str, str]) -> None:
    known_top = {name.upper() for name in Settings.model_fields}
    tables = {
        "HUB": {name.upper() for name in HubSettings.model_fields},
        "HOOKS": {name.upper() for name in HookSettings.model_fields},
        "BUDGET": {name.upper() for name in BudgetSettings.model_fields},
    }
    for name in env:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in _RESERVED_ENV:
            continue
        key = upper[len(ENV_PREFIX) :]
        top, _, sub = key.partition("__")
        ok = top in known_top and (not sub or sub in tables.get(top, set()))
        if not ok:
            raise ConfigError(
                f"unknown environment variable {name}: no such setting "
                f"(settings are {', '.join(sorted(Settings.model_fields))}; "
                f"hub settings use {ENV_PREFIX}HUB__<KEY>)"
            )


def _describe_validation(
    errors: list[ErrorDetails], path: Path | None, env: Mapping[str, str]
) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    set_in_env = {name.upper() for name in env}
    for err in errors:
        key = _key_name(err["loc"]) or "(top level)"
        # A value from the environment is not in the file: say where it came from.
        variable = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
        source = f" (set by {variable})" if err["loc"] and variable in set_in_env else ""
        if err["type"] == "extra_forbidden":
            hint = _did_you_mean(err["loc"])
            lines.append(f"  {key}: unknown key (not a setting of ldx-hotfolder{hint})")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required but not set")
        else:
            message = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) or repr(got) in message else f" (got {got!r})"
            lines.append(f"  {key}: {message}{shown}{source}")
    return "\n".join(lines)


def _did_you_mean(loc: tuple[int | str, ...]) -> str:
    """'; did you mean X?' for an unknown key close to a setting of its table, else ''."""
    tables: dict[str, type[BaseModel]] = {
        "hub": HubSettings,
        "hooks": HookSettings,
        "budget": BudgetSettings,
        "rules": Rule,
    }
    table = tables.get(str(loc[0])) if len(loc) > 1 else Settings
    if table is None or not loc:
        return ""
    # Lower-cased first, so a key in another case always finds its setting.
    close = difflib.get_close_matches(str(loc[-1]).lower(), list(table.model_fields), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _key_name(loc: tuple[int | str, ...]) -> str:
    """A setting's name as the user wrote it: rules count from 1, as in every other
    message about rules (``rules[2].language``, not pydantic's ``rules.1.language``)."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item + 1}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def failpoint_spec() -> str | None:
    """The crash-test failpoints armed through ``LDX_HOTFOLDER_FAILPOINT`` (tests only)."""
    return os.environ.get("LDX_HOTFOLDER_FAILPOINT") or None


class ServiceManager(NamedTuple):
    """What systemd tells the service through its environment (sd_notify(3))."""

    notify_socket: str | None
    watchdog_usec: int | None
    watchdog_pid: int | None


def service_manager(environ: Mapping[str, str] | None = None) -> ServiceManager:
    """``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``, when systemd set them."""
    env = os.environ if environ is None else environ

    def number(name: str) -> int | None:
        value = env.get(name, "")
        return int(value) if value.isdigit() else None

    return ServiceManager(
        env.get("NOTIFY_SOCKET") or None, number("WATCHDOG_USEC"), number("WATCHDOG_PID")
    )


def resolve_api_key(hub: HubSettings, environ: Mapping[str, str] | None = None) -> str:
    """Return the API key from ``api_key``, ``api_key_file`` or the systemd credential.

    Read anew on each call, so a fixed key file takes effect without a restart. Every key
    read is registered with the log scrubber, and must be one header-safe token (else an
    HTTP library would quote it back in an error message).
    """
    key = _find_api_key(hub, os.environ if environ is None else environ)
    register_secret(key)
    if not key.isascii() or not key.isprintable() or any(ch.isspace() for ch in key):
        raise ConfigError(
            "the API key contains spaces, control or non-ASCII characters; check the key "
            "file or credential (the key is not shown)"
        )
    return key


def _find_api_key(hub: HubSettings, env: Mapping[str, str]) -> str:
    if hub.api_key is not None:
        return hub.api_key.get_secret_value().strip()
    candidates: list[Path] = []
    if hub.api_key_file is not None:
        candidates.append(hub.api_key_file)
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME)
    for candidate in candidates:
        try:
            key = candidate.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read the API key file {candidate}: {exc.strerror}") from None
        if key:
            return key
        raise ConfigError(f"the API key file {candidate} is empty")
    raise ConfigError(
        "no API key: set hub.api_key_file (or hub.api_key, or the systemd credential "
        f"'{CREDENTIAL_NAME}')"
    )


def check_folders(settings: Settings) -> list[str]:
    """Return what is wrong with the configured folders (empty when all is well)."""
    problems: list[str] = []
    inbox = settings.inbox.absolute()
    outbox = settings.outbox.absolute()
    if not inbox.is_dir():
        problems.append(f"inbox {inbox} does not exist or is not a folder")
    elif not os.access(inbox, os.R_OK | os.X_OK):
        problems.append(f"inbox {inbox} is not readable")
    problems += _nesting_problems(inbox, "outbox", outbox)
    if settings.archive_dir is not None:
        archive = settings.archive_dir.absolute()
        problems += _nesting_problems(inbox, "archive_dir", archive)
        problems += _archive_outbox_problems(outbox, archive)
    problems += [_own_file_problem(inbox, name, path) for name, path in _own_files(settings)]
    problems = [problem for problem in problems if problem]
    for name, folder in _writable_folders(settings):
        problem = _writable_problem(name, folder)
        if problem:
            problems.append(problem)
    return problems


def _writable_folders(settings: Settings) -> list[tuple[str, Path]]:
    folders = [("outbox", settings.outbox.absolute())]
    if settings.archive_dir is not None:
        folders.append(("archive_dir", settings.archive_dir.absolute()))
    if _removes_inputs(settings):
        folders.append(("inbox", settings.inbox.absolute()))
    url = settings.database_url
    if url.startswith("sqlite:///"):
        folders.append(("state_db folder", Path(url.removeprefix("sqlite:///")).parent))
    return folders


def _removes_inputs(settings: Settings) -> bool:
    """Whether a converted input may leave the inbox (deleted, or archived by a rename)."""
    # A rule may say so for its files even when the top level keeps them.
    chosen = {settings.on_success, *(rule.on_success for rule in settings.rules)}
    return not chosen.isdisjoint({"delete", "archive"})


def _own_files(settings: Settings) -> list[tuple[str, Path]]:
    """The daemon's own state files: the SQLite database (with its -wal), the heartbeat."""
    files: list[tuple[str, Path]] = []
    url = settings.database_url
    if url.startswith("sqlite:///"):
        files.append(("state_db", Path(url.removeprefix("sqlite:///"))))
    if settings.heartbeat_file is not None:  # else it sits beside the database
        files.append(("heartbeat_file", settings.heartbeat_file.absolute()))
    return files


def _own_file_problem(inbox: Path, name: str, path: Path) -> str:
    # Inside the inbox they would be taken as inputs, refused and re-queued on every change.
    inbox_r, folder_r = inbox.resolve(), path.absolute().parent.resolve()
    if inbox_r == folder_r or inbox_r in folder_r.parents:
        return f"{name} {path} is inside the inbox {inbox}; it would be taken as an input"
    return ""


def _nesting_problems(inbox: Path, name: str, other: Path) -> list[str]:
    inbox_r, other_r = inbox.resolve(), other.resolve()
    if inbox_r == other_r:
        return [f"{name} {other} is the inbox itself; they must be separate folders"]
    if inbox_r in other_r.parents:
        return [f"{name} {other} is inside the inbox {inbox}; outputs would be taken as inputs"]
    if other_r in inbox_r.parents:
        return [f"the inbox {inbox} is inside {name} {other}; they must not be nested"]
    return []


def _archive_outbox_problems(outbox: Path, archive: Path) -> list[str]:
    """Why archive_dir and the outbox overlap, if they do."""
    # Archived inputs would show up among the outputs that people and other programs read.
    outbox_r, archive_r = outbox.resolve(), archive.resolve()
    if outbox_r == archive_r:
        return [f"archive_dir {archive} is the outbox itself; they must be separate folders"]
    if outbox_r in archive_r.parents:
        return [
            f"archive_dir {archive} is inside the outbox {outbox}; "
            "archived inputs would mix with the outputs"
        ]
    if archive_r in outbox_r.parents:
        return [f"the outbox {outbox} is inside archive_dir {archive}; they must not be nested"]
    return []


def _writable_problem(name: str, folder: Path) -> str | None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{name} {folder} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{name} {folder} is not writable (checked {existing})"
    return None


# Settings a SIGHUP applies at once (besides reading the API key again, from the file or
# credential the daemon started with); every other change waits for a restart.
RELOADABLE = frozenset({"log_level", "log_format"})


def changed_settings(old: Settings, new: Settings) -> list[str]:
    """Names of the settings that differ (``hub.x`` for the hub table)."""
    changed = [
        name
        for name in Settings.model_fields
        if name != "hub" and getattr(old, name) != getattr(new, name)
    ]
    changed += [
        f"hub.{name}"
        for name in HubSettings.model_fields
        if getattr(old.hub, name) != getattr(new.hub, name)
    ]
    return changed


def split_reload(changed: list[str]) -> tuple[list[str], list[str]]:
    """(applied at once, needing a restart) among changed settings."""
    applied = [name for name in changed if name in RELOADABLE]
    return applied, [name for name in changed if name not in RELOADABLE]
