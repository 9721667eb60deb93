"""Start-up reconciliation of the folders with the table.

Every job resumes from its recorded stage (the worker's steps are idempotent), so what is
left here is what only the folders know: temporary downloads that a crash left behind.
This instance's own are removed (the jobs that were writing them download again); in an
outbox shared by several instances, another's temporary file is removed only once it has
not changed for an hour (its instance died, or it predates instance names), so that a
starting instance never pulls a download from under a running one. Running it twice
changes nothing the second time.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.logs import get_logger
from daemon.outbox.layout import TEMP_MARKER

log = get_logger(component="reconcile")
STALE_SECONDS = 3600.0  # another instance's temporary file untouched this long is dead


def stale_temporaries(outbox: Path) -> list[Path]:
    """The daemon's temporary files anywhere under ``outbox``."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(outbox):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
        found += [Path(folder, name) for name in files if _is_temporary(name)]
    return found


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and TEMP_MARKER in name


def is_leftover(name: str, instance: str | None, age: float) -> bool:
    """Whether a temporary file is to be removed: this instance's, or a dead one's."""
    suffix = name.rpartition(TEMP_MARKER)[2]
    if instance is None or suffix.startswith(f"{instance}-"):
        return True
    return age >= STALE_SECONDS


def sweep(outbox: Path, instance: str | None = None, now: float | None = None) -> int:
    """Remove temporary files a crash left in the outbox; return how many.

    ``instance`` None removes every one (a single daemon owns the outbox).
    """
    removed = 0
    for path in stale_temporaries(outbox):
        try:
            age = now - path.lstat().st_mtime if now is not None else 0.0
            if not is_leftover(path.name, instance, age):
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    if removed:
        log.info("removed temporary files left by an earlier stop", count=removed)
    return removed
