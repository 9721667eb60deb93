"""Advice: what each error code means and what an office administrator does about it.

Every code the daemon stores in its table or shows (``status``, ``jobs``, ``explain``,
the error files) has one entry: what happened, what to do, and whether ``ldx-hotfolder
retry`` can help (a corrected file is needed when it cannot). ``docs/troubleshooting.md``
holds the same table; a test keeps the two equal and checks that every code raised in
``daemon/`` is listed. Codes the hub sends of its own (a failed conversion's reason) get
the entry of ``HUB_CODE``. ``os_error_text`` words a failed file operation.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

HUB_CODE = "(any other code)"
HTTP_CODE = "http_NNN"


@dataclass(frozen=True)
class Advice:
    """One code: what it means, what to do, and whether ``retry`` can help."""

    meaning: str
    action: str
    retry_helps: bool = True


_INPUT = "Nothing was sent to the hub, so nothing was paid."
_ON_ITS_OWN = "Nothing, while it passes: the work waits and goes on by itself."

ADVICE: dict[str, Advice] = {
    # -- the input itself (refused before anything is paid) ------------------------------
    "too_large": Advice(
        f"The file is larger than the hub takes in one upload (200 MB). {_INPUT}",
        "Split it into smaller files, or scan it at a lower resolution, and drop those in "
        "the inbox.",
        retry_helps=False,
    ),
    "empty_file": Advice(
        f"The file is empty (0 bytes): the scanner or the copy never wrote it. {_INPUT}",
        "Scan or copy the document again under the same name.",
        retry_helps=False,
    ),
    "incomplete": Advice(
        "The file is cut off (it was not written to the end) and stayed so.",
        "Scan or copy the document again under the same name; if it happens often, check "
        "the scanner's connection to the share.",
        retry_helps=False,
    ),
    "unsupported_type": Advice(
        f"The file is no PDF, TIFF, JPEG, PNG or BMP, whatever its name says. {_INPUT}",
        "Save or export it as one of those and drop it in the inbox again.",
        retry_helps=False,
    ),
    "path_too_long": Advice(
        "The path its output or error file would get is longer than the system allows "
        f"(4095 bytes, or 255 for one name). {_INPUT}",
        "Move the file to a folder nearer the top of the inbox, or give it a shorter name.",
        retry_helps=False,
    ),
    "hard_link": Advice(
        "The file has several hard links; such a file can show a file from outside the "
        "inbox, so it is not read.",
        "Copy the file into the inbox instead of linking it (or set allow_hardlinks = true "
        "if such links are expected there), then run retry.",
    ),
    "unreadable": Advice(
        "The daemon's user may not read the file.",
        "Give the daemon's user or group read permission on the file, then run retry.",
    ),
    "read_error": Advice(
        "Reading the file failed in the system (a disk or network share error); the "
        "message says why.",
        "Check the disk or the share the inbox is on, then run retry.",
    ),
    "unsafe_output_path": Advice(
        "A folder on the way to the output (in the outbox or the archive) is a link or a "
        "file, and the daemon never writes through one.",
        "Replace the link with a real folder (or move the file in the way), then run retry.",
    ),
    "bad_folder_settings": Advice(
        "The folder's .ldx-hotfolder.toml cannot be read, or names an engine, language or "
        "format the hub does not offer.",
        "Fix that file as the message says (it names the valid choices), then run retry.",
    ),
    "input_missing": Advice(
        "The file vanished from the inbox (or was replaced by a link or a folder) before "
        "it was converted.",
        "Put the file back in the inbox if it should be converted; it is taken by itself.",
        retry_helps=False,
    ),
    "input_changed": Advice(
        "The file changed while it was being sent; the new version is a new input.",
        "Nothing: the new version is converted by itself.",
        retry_helps=False,
    ),
    "input_kept": Advice(
        "The output is published, but the input could not be deleted or archived (on_success).",
        "Let the daemon's user write to the input's folder (and archive_dir); move or "
        "delete this input by hand, it is not converted again.",
        retry_helps=False,
    ),
    # -- the hub's verdict on a conversion -----------------------------------------------
    HUB_CODE: Advice(
        "The hub could not convert the file; the code and the message are the hub's own.",
        "Do what the message says (often: scan the document again); if the file opens "
        "fine on a computer, run retry once (it is paid again) or ask LDX hub support.",
    ),
    "remote_failed": Advice(
        "The hub failed the conversion without giving a reason.",
        "Check that the file opens on a computer; run retry once (it is paid again), or "
        "ask LDX hub support with the hub job id from `ldx-hotfolder jobs --json`.",
    ),
    "unknown": Advice(
        "The hub failed the conversion and gave its reason without a code.",
        "Do what the message says; if the file is fine, run retry once (it is paid again).",
    ),
    "too_many_conversions": Advice(
        "The hub was paid for as many conversions of this file as max_conversions allows, "
        "and delivered no output.",
        "Check the file and the hub's status; run retry to pay for one more conversion.",
    ),
    "hub_job_deadline": Advice(
        "The hub kept the conversion running longer than job_deadline, so it was given up.",
        "Check the hub's status or ask LDX hub support; run retry to convert it again (it "
        "is paid again).",
    ),
    "not_found": Advice(
        "The hub no longer knows the uploaded file or the job (it expired or was removed).",
        "Run retry: the file is uploaded again.",
    ),
    "output_refused": Advice(
        "The hub's output broke one of the daemon's safety limits (size, nesting or "
        "compression) and was removed.",
        "Check the input; if it is an ordinary scan, ask LDX hub support. Retrying pays "
        "for the same conversion again.",
        retry_helps=False,
    ),
    "output_too_large": Advice(
        "The hub's output is larger than this input may produce (ten times its size plus "
        "50 MB, at most max_output_mb).",
        "If such large outputs are expected, raise max_output_mb, then run retry.",
    ),
    "http_413": Advice(
        "The hub says the file is larger than it accepts.",
        "Split it into smaller files, or scan it at a lower resolution, and drop those in "
        "the inbox.",
        retry_helps=False,
    ),
    HTTP_CODE: Advice(
        "The hub answered with this HTTP status: a 5xx or 408 is the hub's own trouble and "
        "is retried by itself; a 4xx is the hub refusing the request, for the reason in "
        "the message.",
        "For a 5xx: nothing, it is retried. For a 4xx: fix what the message says, then run retry.",
    ),
    # -- a person must act; the work waits meanwhile -------------------------------------
    "auth_rejected": Advice(
        "The hub rejects the API key; all work waits, nothing fails.",
        "Put a valid key in the key file (or the credential) and run systemctl reload "
        "ldx-hotfolder; the work goes on by itself.",
    ),
    "plan_refused": Advice(
        "The hub refuses RenderOCR for this key while the key works elsewhere: the plan "
        "may not include it. The work waits.",
        "Ask the LDX hub account owner to enable RenderOCR for the key; the work goes on "
        "by itself.",
    ),
    "credit_refused": Advice(
        "The hub refuses new conversions: the account's credit is used up (HTTP 402). "
        "The work waits.",
        "Top up the LDX hub account; the work goes on by itself.",
    ),
    "hub_refused": Advice(
        "The hub refuses one kind of request while the key works. The work waits.",
        "Do what the message says (credit, plan); the work goes on by itself.",
    ),
    "adopted": Advice(
        "Not an error: the state database had no record of this file, and its output was "
        "already in the outbox, so it was counted as converted instead of paid for again.",
        "Nothing. If that output is not this file's, delete it and drop the file again.",
    ),
    "budget_reached": Advice(
        "The page budget ([budget] pages_per_day or pages_per_month) is used up; new "
        "conversions wait, nothing fails, and they go on when the day or month turns.",
        "Nothing: it resumes by itself on the date given. To convert sooner, raise the "
        "budget in config.toml and restart the daemon.",
    ),
    "config_error": Advice(
        "The configuration is invalid; the message names the setting.",
        "Fix config.toml as the message says; `ldx-hotfolder check` tells when it is "
        "right. Then start the daemon again.",
    ),
    "already_running": Advice(
        "Another ldx-hotfolder already runs with this state database and instance id.",
        "Use the one that runs (systemctl status ldx-hotfolder), or stop it first; several "
        "daemons on one shared database each need an instance_id of their own.",
    ),
    "operator_action": Advice(
        "Nothing can go on until a person acts; the message says what.",
        "Do what the message says; the work goes on by itself.",
    ),
    # -- passing causes: retried by themselves -------------------------------------------
    "network": Advice(
        "The hub cannot be reached (no connection: the network is down, or the hub is offline).",
        f"{_ON_ITS_OWN} If it lasts, check the network, the proxy and hub.base_url.",
    ),
    "timeout": Advice(
        "The hub did not answer in time.",
        f"{_ON_ITS_OWN} If it lasts, check the network and the hub's status.",
    ),
    "deadline": Advice(
        "A request to the hub took longer than hub.deadline and was given up.",
        f"{_ON_ITS_OWN} On a slow line, raise hub.deadline.",
    ),
    "hub_unavailable": Advice(
        "The hub answered with a server error.",
        f"{_ON_ITS_OWN} If it lasts, check the hub's status.",
    ),
    "rate_limited": Advice(
        "The hub asked the daemon to slow down (HTTP 429).",
        "Nothing: requests wait as long as the hub asks. If it happens all day, lower "
        "max_in_flight or hub.max_requests_per_minute.",
    ),
    "not_yet": Advice(
        "The hub reports the conversion done, but its output is not stored yet.",
        "Nothing: it is fetched again shortly, without a new conversion.",
    ),
    "state_db": Advice(
        "The state database cannot be written (the disk is full, an I/O error, or the "
        "database server is gone).",
        "Free disk space, or bring the database server back; the daemon goes on by itself.",
    ),
    "disk_full": Advice(
        "No space is left on the disk of the outbox or the state folder.",
        "Free disk space; the waiting outputs are written by themselves.",
    ),
    "bad_response": Advice(
        "An answer of the hub could not be read (a proxy or gateway hiccup).",
        f"{_ON_ITS_OWN} If it lasts, check for a proxy between the daemon and the hub.",
    ),
    "bad_output": Advice(
        "The downloaded output is not a valid Office document.",
        "Nothing: it is downloaded again, without a new conversion. If it lasts, ask LDX "
        "hub support.",
    ),
    "short_download": Advice(
        "The download broke off before the whole output arrived.",
        "Nothing: it is downloaded again, without a new conversion.",
    ),
    "too_slow": Advice(
        "A transfer ran slower than hub.min_transfer_rate and was cut.",
        f"{_ON_ITS_OWN} On a slow line, lower hub.min_transfer_rate.",
    ),
    "local_io": Advice(
        "A file operation on this computer failed; the message says which and why.",
        "Fix the folder or disk the message names (permissions, space, a read-only "
        "mount); the job is tried again by itself.",
    ),
    "publish_failed": Advice(
        "The output's folder cannot be written; the daemon keeps the downloaded output.",
        "Let the daemon's user write to that folder; the output is published by itself, "
        "without a new conversion.",
    ),
    "internal": Advice(
        "An unexpected error in the daemon (a bug).",
        "Run retry; if it comes back, report it with the log lines around it.",
    ),
    "transient": Advice(
        "A passing problem.",
        f"{_ON_ITS_OWN}",
    ),
    "failed": Advice(
        "The file could not be converted; the message says why.",
        "Do what the message says, then run retry (or drop a corrected file under the same name).",
    ),
    "error": Advice(
        "Something went wrong; the message says what.",
        "Do what the message says; if it is unclear, report it with the log lines around it.",
    ),
}


def advice_for(code: str | None) -> Advice:
    """The advice for ``code``: its own, an HTTP status's, or the hub's own code's."""
    if code in ADVICE:
        return ADVICE[code]
    if code is not None and code.startswith("http_") and code[5:].isdigit():
        return ADVICE[HTTP_CODE]
    return ADVICE[HUB_CODE]


_OS_ERRORS = {
    errno.EROFS: "the disk is mounted read-only",
    errno.EACCES: "the daemon's user has no permission there",
    errno.EPERM: "the daemon's user has no permission there",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.ENOENT: "it does not exist (any more)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EIO: "the disk reported an input/output error",
    errno.ELOOP: "a part of the path is a link, which is never followed",
}


def os_error_text(exc: OSError) -> str:
    """A failed file operation in words: which path, and why (no errno numbers)."""
    why = _OS_ERRORS.get(exc.errno or 0) or (exc.strerror or type(exc).__name__).lower()
    return f"{exc.filename}: {why}" if exc.filename else why
