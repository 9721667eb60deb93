"""How a ``Hub`` is built: its limits, retention times, timing, seed and first knobs.

The knobs in ``faults``, ``storage`` and ``variants`` are only where the hub starts; they
can change while it runs (``Hub.update_knobs``). The rest is fixed for its life.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.emulator.knobs import Faults, Storage, Variants

# "200 MB" and "5 MB" are read as binary megabytes, the more lenient reading: a client
# that stays under 200 * 10**6 bytes is safe with either.
MAX_UPLOAD_BYTES = 200 * 1024 * 1024
MAX_CHUNK_BYTES = 5 * 1024 * 1024
FILE_TTL_SECONDS = 24 * 3600.0
JOB_TTL_SECONDS = 3 * 24 * 3600.0
DEFAULT_API_KEY = "demo-key"


@dataclass(frozen=True)
class HubSettings:
    """How a ``Hub`` is built; the knobs in ``faults``, ``storage`` and ``variants`` can
    change later (``Hub.update_knobs``)."""

    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    revoked_keys: tuple[str, ...] = ()
    processing_time: float | tuple[float, float] = 3.0  # seconds, or a (min, max) range
    queue_delay: float = 0.0  # seconds a job stays queued
    output_size: int = 0  # outputs padded to at least this many bytes (benchmarks); 0 = off
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    file_ttl: float = FILE_TTL_SECONDS
    job_ttl: float = JOB_TTL_SECONDS
    seed: int | None = None
    faults: Faults = field(default_factory=Faults)
    storage: Storage = field(default_factory=Storage)
    variants: Variants = field(default_factory=Variants)

    def __post_init__(self) -> None:
        low, high = self.processing_range
        if not 0 <= low <= high:
            raise ValueError(f"processing_time must be >= 0 and min <= max, got {low}-{high}")
        if self.queue_delay < 0:
            raise ValueError("queue_delay must be >= 0")
        if self.output_size < 0:
            raise ValueError("output_size must be >= 0")
        if self.max_upload_bytes < 1 or self.max_chunk_bytes < 1:
            raise ValueError("upload limits must be positive")
        if self.file_ttl <= 0 or self.job_ttl <= 0:
            raise ValueError("retention times must be positive")

    @property
    def processing_range(self) -> tuple[float, float]:
        """Processing time as a (min, max) range; equal ends for a fixed time."""
        if isinstance(self.processing_time, tuple):
            return self.processing_time
        return (self.processing_time, self.processing_time)
