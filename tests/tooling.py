"""Test helpers for the service tests: system tools, free ports, datagram sockets."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str) -> str:
    """The path of tool ``name``; a missing tool fails under CI and skips elsewhere."""
    venv_bin = Path(sys.executable).parent
    found = shutil.which(name) or shutil.which(name, path=str(venv_bin))
    if found:
        return found
    message = f"{name} is not installed (.ci/run installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def program() -> str:
    """The installed ``ldx-hotfolder`` script of this environment."""
    script = Path(sys.executable).parent / "ldx-hotfolder"
    assert script.exists(), "install the project first: pip install -e '.[dev]'"
    return str(script)
