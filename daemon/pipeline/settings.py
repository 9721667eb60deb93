"""The values the pipeline's steps need, read once from the configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.outbox.permissions import OutputPermissions


@dataclass(frozen=True)
class StepSettings:
    """The values the steps need (from the configuration, read once)."""

    inbox: Path
    outbox: Path
    held: Path  # where outputs that cannot be published yet are kept
    instance: str
    perms: OutputPermissions
    allow_hardlinks: bool = False
    on_duplicate: str = "reuse"
    on_success: str = "keep"
    archive_dir: Path | None = None
    max_conversions: int = 2
    resubmit_delay: float = 20.0
    job_deadline: float = 6 * 3600.0  # seconds the hub may keep one job running
    max_output_mb: float = 2000.0  # no output may be larger, whatever the input
