"""Failpoints: crash the process at a named step, for crash-recovery tests.

``LDX_HOTFOLDER_FAILPOINT="after-upload:2"`` makes the second pass through the step
``after-upload`` end the process at once with ``os._exit(137)``, as SIGKILL would: no
cleanup, no flush. Several points are separated by commas. Unset, a hit costs one dict
lookup.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

POINTS = (
    "after-upload",  # the hub has the file; its id is not committed
    "after-create",  # the hub has the job; its id is not committed
    "mid-download",  # part of the output is in the temporary file
    "after-publish",  # the output is in place; the table does not know yet
    "after-commit",  # the table says published; the input is not handled yet (delete/archive)
    "before-done",  # the input is handled; the job is not marked done (delete/archive)
)

_targets: dict[str, int] = {}
_hits: Counter[str] = Counter()


def parse(spec: str) -> dict[str, int]:
    """``"name:n,name2:m"`` as a mapping; ValueError names a bad entry."""
    targets: dict[str, int] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = entry.partition(":")
        if name not in POINTS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad failpoint {entry!r}; use NAME:N with NAME in {POINTS}")
        targets[name] = int(count)
    return targets


def configure(spec: str | None) -> None:
    """Arm the failpoints of ``spec`` (None or empty disarms all)."""
    _targets.clear()
    _hits.clear()
    if spec:
        _targets.update(parse(spec))


def hit(name: str) -> None:
    """Pass through the step ``name``; end the process if this is the armed hit."""
    if name not in _targets:
        return
    _hits[name] += 1
    if _hits[name] == _targets[name]:
        sys.stderr.write(f"failpoint {name}:{_hits[name]} reached; exiting\n")
        sys.stderr.flush()
        os._exit(137)
