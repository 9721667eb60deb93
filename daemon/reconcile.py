"""Start-up reconciliation of the folders with the table.

Every job resumes from its recorded stage (the worker's steps are idempotent), so what is
left here is what only the folders know: temporary downloads that a crash left behind.
They are removed; the jobs that were writing them download again. Running it twice
changes nothing the second time.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.layout import TEMP_MARKER
from daemon.logs import get_logger

log = get_logger(component="reconcile")


def stale_temporaries(outbox: Path) -> list[Path]:
    """The daemon's temporary files anywhere under ``outbox``."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(outbox):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
        found += [Path(folder, name) for name in files if _is_temporary(name)]
    return found


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and TEMP_MARKER in name


def sweep(outbox: Path) -> int:
    """Remove temporary files a crash left in the outbox; return how many."""
    removed = 0
    for path in stale_temporaries(outbox):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    if removed:
        log.info("removed temporary files left by an earlier stop", count=removed)
    return removed
