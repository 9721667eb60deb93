"""The Docker image as declared: multi-stage, non-root, volumes, health check, hadolint clean.

No Docker engine runs here, so the tests read what the Dockerfile and compose.yaml
declare, load the image's configuration the way the container would, and lint.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from daemon.config import load_settings
from tests.tooling import REPO, require_tool

DOCKERFILE = REPO / "Dockerfile"
VOLUMES = {"/srv/inbox", "/srv/outbox", "/var/lib/ldx-hotfolder"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined]


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def runtime(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs)."""
    last = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last:]


def args_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for op, rest in steps:
        if op == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            found[name] = default
    return found


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for op, rest in steps:
        if op == "ENV":
            found.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return found


def test_multi_stage_on_a_slim_python(steps: list[tuple[str, str]]) -> None:
    """A build stage and a runtime stage, both from a slim Python 3.11 image."""
    froms = [rest for op, rest in steps if op == "FROM"]
    assert len(froms) >= 2
    base = args_of(steps)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base
    assert "COPY --from=build" in " ".join(f"{op} {rest}" for op, rest in runtime(steps))


def test_runs_as_a_fixed_non_root_user(steps: list[tuple[str, str]]) -> None:
    """USER is a fixed numeric UID:GID from build arguments, not root."""
    final = runtime(steps)
    args = args_of(final)
    users = [rest for op, rest in final if op == "USER"]
    assert users == ["${UID}:${GID}"]
    assert int(args["UID"]) >= 1000
    assert int(args["GID"]) >= 1000


def test_exec_form_entrypoint_stop_signal_and_health_check(steps: list[tuple[str, str]]) -> None:
    """Exec-form ENTRYPOINT/CMD (signals reach the daemon), STOPSIGNAL, HEALTHCHECK health."""
    final = dict(runtime(steps))
    assert json.loads(final["ENTRYPOINT"]) == ["ldx-hotfolder"]
    assert json.loads(final["CMD"]) == ["run"]
    assert final["STOPSIGNAL"] == "SIGTERM"
    health = final["HEALTHCHECK"]
    command = json.loads(health.split("CMD", 1)[1])
    assert command == ["ldx-hotfolder", "health"]
    assert "--interval=" in health
    assert "--start-period=" in health


def test_volumes_and_configuration_match(
    steps: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's config puts inbox, outbox and state in the volumes; the key is a secret file."""
    final = runtime(steps)
    volumes = {v for op, rest in final if op == "VOLUME" for v in json.loads(rest)}
    assert volumes == VOLUMES
    env = env_of(final)
    assert env["LDX_HOTFOLDER_HUB__API_KEY_FILE"] == "/run/secrets/api-key"
    assert not [name for name in env if name.endswith(("API_KEY", "__API_KEY"))]
    copied = [rest.split() for op, rest in final if op == "COPY" and "config.toml" in rest]
    assert copied, "the image ships a configuration"
    source, target = copied[0]
    assert env["LDX_HOTFOLDER_CONFIG"] == target
    for name, value in env.items():
        if name.startswith("LDX_HOTFOLDER_") and name != "LDX_HOTFOLDER_CONFIG":
            monkeypatch.setenv(name, value)
    settings = load_settings(REPO / source)
    assert str(settings.inbox) == "/srv/inbox"
    assert str(settings.outbox) == "/srv/outbox"
    assert str(settings.hub.api_key_file) == "/run/secrets/api-key"
    state = Path("/var/lib/ldx-hotfolder")
    assert settings.database_url == f"sqlite:///{state / 'state.db'}"
    assert settings.health_socket_path.parent == state


def test_build_context_is_only_what_the_image_needs() -> None:
    """.dockerignore lets in the package and its metadata, never .venv, .git or tests."""
    rules = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert rules[rules.index("*")] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "daemon", "docker"}


def test_hadolint_is_clean() -> None:
    """hadolint reports nothing, not even style notes."""
    tool = require_tool("hadolint")
    result = subprocess.run(
        [tool, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_example_is_locked_down() -> None:
    """Read-only root, no capabilities, no new privileges, init, restart, the key as a secret."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    service = compose["services"]["ldx-hotfolder"]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "cap_add" not in service
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["init"] is True
    assert service["restart"] == "unless-stopped"
    assert "ports" not in service
    assert "privileged" not in service
    assert service["secrets"] == ["api-key"]
    assert "file" in compose["secrets"]["api-key"]
    assert not [k for k in service.get("environment", {}) if "API_KEY" in k.upper()]
    targets = {volume.split(":")[1] for volume in service["volumes"]}
    assert targets == VOLUMES
    assert service["build"]["args"]["UID"] == "10001"


def test_scale_out_compose_shares_inbox_outbox_and_database_only() -> None:
    """compose.scale.yaml: two locked-down instances share only inbox, outbox and PostgreSQL DB."""
    # Each has its own id and local state; the schema is upgraded before they start.
    compose = yaml.safe_load((REPO / "compose.scale.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    instances = [services["ldx-hotfolder-1"], services["ldx-hotfolder-2"]]
    ids = {s["environment"]["LDX_HOTFOLDER_INSTANCE_ID"] for s in instances}
    assert ids == {"node-1", "node-2"}
    for service in instances:
        env = service["environment"]
        assert env["LDX_HOTFOLDER_STATE_DB"].startswith("postgresql+psycopg://")
        assert ":" not in env["LDX_HOTFOLDER_STATE_DB"].split("//")[1].split("@")[0], "no password"
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        targets = {volume.split(":")[1] for volume in service["volumes"]}
        assert targets == {"/srv/inbox", "/srv/outbox"}, "only the folders are shared"
        local = {mount.split(":")[0] for mount in service["tmpfs"]}
        assert local == {"/tmp", "/var/lib/ldx-hotfolder"}, "temporary files stay local"
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert instances[0]["volumes"] == instances[1]["volumes"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["postgres"]["image"].startswith("postgres:15")
    assert compose["networks"]["db"]["internal"] is True
