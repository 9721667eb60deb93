"""systemd notification protocol (sd_notify(3)): readiness, status, watchdog and stopping.

One datagram of ``KEY=value`` lines sent over an ``AF_UNIX`` datagram socket to the
address systemd put in ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a
leading ``@``). No dependency: the protocol is a few lines of ``socket``. Outside systemd
(no socket) every call does nothing, so the daemon runs the same everywhere.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from daemon.logs import get_logger

log = get_logger(component="notify")


def socket_address(value: str) -> str | bytes:
    """The ``connect`` address of ``$NOTIFY_SOCKET``: ``@name`` is the abstract ``\\0name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")
    return value


def message(**fields: str | int) -> bytes:
    """One notification: ``READY=1``-style lines, newline-separated, no newline in values."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode("utf-8")


def watchdog_interval(usec: int | None, pid: int | None, my_pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None when not asked.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for.
    """
    if not usec or usec <= 0:
        return None
    if pid is not None and pid != my_pid:
        return None
    return usec / 2_000_000


@dataclass(frozen=True)
class Notifier:
    """Sends notifications to systemd's socket; a no-op when there is none."""

    address: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given."""
        return bool(self.address)

    def send(self, **fields: str | int) -> bool:
        """Send one notification; return whether it went out (errors are logged, not raised).

        Never blocks: the event loop calls this, and a full queue only loses one message.
        """
        if not self.address:
            return False
        data = message(**fields)
        flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        try:
            with socket.socket(socket.AF_UNIX, flags) as sock:
                sock.connect(socket_address(self.address))
                sock.send(data)
        except BlockingIOError:
            # The receiver's queue is full: drop this one rather than block the event loop.
            log.debug("systemd's notification queue is full; dropped one", fields=list(fields))
            return False
        except OSError as exc:
            log.warning("cannot notify systemd", error=exc.strerror, socket=self.address)
            return False
        return True

    def ready(self, status: str) -> bool:
        """Tell systemd that start-up is complete."""
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        """Update the one-line status ``systemctl status`` shows."""
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        """Prove liveness to systemd's watchdog."""
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        """Tell systemd a configuration reload started."""
        return self.send(RELOADING=1, STATUS="reloading the configuration")

    def stopping(self) -> bool:
        """Tell systemd the daemon is shutting down."""
        return self.send(STOPPING=1, STATUS="stopping")
