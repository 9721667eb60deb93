"""Every exception ldx-hotfolder raises on purpose, split by what the caller must do.

The tree::

    LdxError                      root of every error raised on purpose
    ├── RetryLater                transient: the same step may succeed later; never fails
    │   │                         a job for a network, 5xx or 429 cause
    │   ├── HubUnavailable        the hub unreachable, a timeout or a 5xx (maybe_done: the
    │   │                         request may have taken effect before the answer was lost)
    │   ├── HubBusy               HTTP 429: slow down (retry_after honoured by every request)
    │   ├── NotYet                the hub has not finished something it will (an output that
    │   │                         answers 404 before its expiry)
    │   └── StateUnavailable      the state database failed (full disk, I/O error, server
    │                             gone): wait and try again
    ├── JobFailed                 a permanent fault of one input: fail its job with the reason
    │   ├── RemoteNotFound        the hub no longer knows a file or job (expired, or never)
    │   ├── OutputRefused         the hub's output breaks a limit (size, depth, ratio...)
    │   ├── UnsafeOutputPath      a link or non-folder where a folder or new file must be
    │   ├── HardLinked            the input has several hard links, which are not allowed
    │   ├── InputChanged          the input changed after it was taken (a new version)
    │   └── InputGone             the input vanished or is no regular file any more
    │       └── InputUnreadable   ... or the daemon's user may not read it
    └── OperatorAction            nothing works until a person acts; pause or stop, say so
        ├── AuthRejected          the hub rejects the API key (401/403 everywhere)
        ├── HubRefused            the hub refuses one kind of request (402 credit, 403 plan)
        ├── BudgetReached         the next conversion would pass the page budget: new
        │                         conversions wait for the day or month to turn
        └── ConfigError           the configuration is invalid; exit 2 with the key and fix
            ├── SchemaMismatch    the state database's schema is not this program's
            ├── StateDamaged      the state database is damaged, vanished or replaced
            └── FolderFileError   a folder's .ldx-hotfolder.toml is unreadable or invalid

Control-flow signals are kept outside the root, as huey keeps ``RetryTask`` and
structlog ``DropEvent``: they are not errors and nothing logs them as such.

    Signal                        root of the signals
    ├── LeaseLost                 another instance took the job over: let go of it
    ├── Requeue                   send the job back to an earlier stage after a delay
    └── Unhealthy                 the daemon stopped itself because a part stayed dead
    OoxmlProblem                  a downloaded package is invalid (``outbox.verify``)
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
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        maybe_done: bool = False,
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.maybe_done = maybe_done  # the request may have taken effect at the hub


class HubUnavailable(RetryLater):
    """The hub could not be reached, timed out or answered with a server error."""

    code = "hub_unavailable"


class HubBusy(RetryLater):
    """The hub asked us to slow down (HTTP 429)."""

    code = "rate_limited"


class NotYet(RetryLater):
    """The hub has not yet done what it will do (an output not stored yet)."""

    code = "not_yet"


class StateUnavailable(RetryLater):
    """The state database failed (a full disk, an I/O error, a lost server)."""

    code = "state_db"


class JobFailed(LdxError):
    """A permanent fault of one input: fail its job with this reason."""

    code = "failed"


class RemoteNotFound(JobFailed):
    """The hub no longer knows a file or job (expired or never existed)."""

    code = "not_found"


class OutputRefused(JobFailed):
    """The hub's output breaks one of the daemon's limits; the partial file is removed."""

    code = "output_refused"


class UnsafeOutputPath(JobFailed):
    """A link or non-folder where the outbox (or archive) needs a folder or a new file."""

    code = "unsafe_output_path"


class InputGone(JobFailed):
    """The input vanished or was replaced by something that is not a regular file."""

    code = "input_missing"


class InputUnreadable(InputGone):
    """The input is there but the daemon's user may not read it (EACCES or EPERM).

    An ``InputGone`` so that the worker, which only needs to know that the file it
    queued cannot be sent, handles it as before; intake tells it apart and waits.
    """

    code = "unreadable"


class HardLinked(JobFailed):
    """The input has more than one hard link and ``allow_hardlinks`` is off."""

    code = "hard_link"


class InputChanged(JobFailed):
    """The input changed after it was taken; the new version becomes a new job."""

    code = "input_changed"


class OperatorAction(LdxError):
    """Nothing works until a person acts; pause or stop and tell them."""

    code = "operator_action"


class AuthRejected(OperatorAction):
    """The hub rejected the API key (HTTP 401, or 403 on every route)."""

    code = "auth_rejected"


class HubRefused(OperatorAction):
    """The hub refuses one kind of request while the key works (402 credit, 403 plan)."""

    code = "hub_refused"

    def __init__(self, message: str, *, route: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.route = route


class BudgetReached(OperatorAction):
    """The next conversion would pass ``[budget]``: it waits, nothing fails."""

    code = "budget_reached"


class ConfigError(OperatorAction):
    """The configuration is invalid; the message names the key and the fix."""

    code = "config_error"


class SchemaMismatch(ConfigError):
    """The database's schema is older or newer than this program's."""


class StateDamaged(ConfigError):
    """The SQLite state file is not a database, a damaged one, or vanished meanwhile."""


class FolderFileError(ConfigError):
    """A folder file cannot be read or holds an invalid value."""


class Signal(Exception):
    """Root of the control-flow signals (not errors: nothing logs them as failures)."""


class LeaseLost(Signal):
    """Another instance took a job over (this one's lease expired): leave it alone."""


class Requeue(Signal):
    """Send a job back to an earlier stage after a delay (a hub-side failure worth
    converting again)."""

    def __init__(self, stage: str, delay: float, code: str, message: str) -> None:
        super().__init__(message)
        self.stage, self.delay, self.code, self.message = stage, delay, code, message


class Unhealthy(Signal):
    """The daemon stopped itself because a part of it stayed dead (exit 70)."""


class OoxmlProblem(Exception):
    """The file is not a valid OOXML package of the expected type; the message says why."""
