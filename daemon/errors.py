"""The project's exception tree, split by what the caller must do.

``LdxError`` is the root. Below it, three branches name the caller's duty:

- ``RetryLater``: a transient fault (network, 5xx, 429, a busy file); try again after
  a delay, never fail the job for it.
- ``JobFailed``: a permanent fault of this one input (unsupported or broken file, a 4xx
  validation error); fail the job at once with the reason.
- ``OperatorAction``: nothing will work until a person acts (a rejected API key, a bad
  configuration); pause or stop and say so, failing nothing.
"""

from __future__ import annotations


class LdxError(Exception):
    """Root of every error ldx-hotfolder raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RetryLater(LdxError):
    """A transient fault: the same step may succeed later."""

    code = "transient"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class HubUnavailable(RetryLater):
    """The hub could not be reached or answered with a server error."""

    code = "hub_unavailable"


class HubBusy(RetryLater):
    """The hub asked us to slow down (HTTP 429)."""

    code = "rate_limited"


class JobFailed(LdxError):
    """A permanent fault of one input: fail its job with this reason."""

    code = "failed"


class RemoteNotFound(JobFailed):
    """The hub no longer knows a file or job (expired or never existed)."""

    code = "not_found"


class OperatorAction(LdxError):
    """Nothing works until a person acts; pause or stop and tell them."""

    code = "operator_action"


class AuthRejected(OperatorAction):
    """The hub rejected the API key (HTTP 401 or 403)."""

    code = "auth_rejected"


class ConfigError(OperatorAction):
    """The configuration is invalid; the message names the key and the fix."""

    code = "config_error"


class LeaseLost(LdxError):
    """Another instance took a job over (this one's lease expired): leave it alone."""

    code = "lease_lost"
