"""The health socket: how ``health`` and ``status`` ask the running daemon how it is.

The daemon listens on a Unix socket (``health_socket``, by default ``health.sock``
beside the state database) from a thread of its own; each connection gets the last
heartbeat the monitor kept in memory, as one JSON object, and is closed. Nothing is
written to disk for it, so an idle daemon writes nothing (a heartbeat file rewritten
every few seconds wears out the SD card of a small office box). The thread needs no
event loop: a daemon whose loop is stuck still answers, with a heartbeat that grows
old, and ``health`` says it is stuck. No socket, or a refused connection, means no
daemon runs. The socket is the daemon's user's alone (mode 0600; root may ask too), and
a socket left by a killed daemon is replaced at the next start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from daemon.errors import ConfigError
from daemon.logs import get_logger
from daemon.ops.health import Heartbeat

log = get_logger(component="healthsock")
ASK_TIMEOUT = 5.0  # seconds ``health`` waits for an answer (the thread answers at once)
MAX_ANSWER = 1024 * 1024  # a heartbeat is a few hundred bytes; never read more than this
SEND_TIMEOUT = 2.0  # a client that does not read is dropped after this long
# sun_path holds 108 bytes; a longer path is reached through its folder's descriptor.
_MAX_DIRECT = 100


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits in ``sun_path``, however deep the folder is."""
    if len(os.fsencode(path)) <= _MAX_DIRECT:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


def _answers(path: Path) -> bool:
    """Whether a process answers on the socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, _address(path) as address:
        probe.settimeout(1.0)
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


class HealthSocket:
    """Answers every connection with ``latest()``'s heartbeat, from a thread."""

    def __init__(self, path: Path, latest: Callable[[], Heartbeat | None]) -> None:
        self.path = path
        self._latest = latest
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HealthSocket:
        """Bind (replacing a socket a killed daemon left) and answer in the background;
        ConfigError when the path is taken or cannot be made."""
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with _address(self.path) as address:
                sock.bind(address)
            os.chmod(self.path, 0o600)  # connecting needs write access: the daemon's user only
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"health_socket: cannot listen on {self.path}: {exc.strerror}"
            ) from None
        self._sock, self._inode = sock, os.lstat(self.path).st_ino
        self._thread = threading.Thread(target=self._serve, name="health-socket", daemon=True)
        self._thread.start()
        return self

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"health_socket: {self.path} exists and is not a socket")
        if _answers(self.path):
            raise ConfigError(
                f"health_socket: another daemon answers on {self.path}; give each daemon "
                "its own state folder (or health_socket)"
            )
        self.path.unlink()  # left by a daemon that was killed

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                conn, _ = sock.accept()  # blocks: no wake-up while nobody asks
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(SEND_TIMEOUT)
                with contextlib.suppress(OSError):
                    conn.sendall(self._answer())

    def _answer(self) -> bytes:
        beat = self._latest()
        return b"null" if beat is None else beat.to_json().encode("utf-8")

    def close(self) -> None:
        """Stop answering and remove the socket (``health`` then says "not running")."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:  # never another daemon's
                self.path.unlink()


def ask(path: Path, timeout: float = ASK_TIMEOUT) -> Heartbeat | None:
    """The running daemon's last heartbeat, or None when no daemon answers at ``path``."""
    try:
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
            _address(path) as address,
        ):
            sock.settimeout(timeout)
            sock.connect(address)
            data = _read_all(sock)
    except OSError:  # no socket, nobody listening, or no answer in time
        return None
    try:
        return Heartbeat.from_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None  # "null" (no beat yet) or not a heartbeat


def _read_all(sock: socket.socket) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size <= MAX_ANSWER:
        chunk = sock.recv(65536)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)
