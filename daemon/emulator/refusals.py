"""What the hub refuses: the ``HubError`` tree the HTTP layer turns into error answers.

``code`` and ``message`` go into the error body; the class picks the status (404, 400,
413, or the ``expired_status`` / ``missing_input_status`` knobs).
"""

from __future__ import annotations


class HubError(Exception):
    """A request the hub refuses; ``code`` and ``message`` go into the error body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NotFound(HubError):
    """The file, upload session or job does not exist (or has expired)."""


class InvalidRequest(HubError):
    """The request is malformed or names something the engine does not offer."""


class PayloadTooLarge(HubError):
    """An upload or chunk is over its size limit."""


class Expired(NotFound):
    """The file or job existed and has expired (404 or 410, per ``expired_status``)."""


class MissingInput(InvalidRequest):
    """A job names a file_id the hub does not have (status and code per Variants)."""
