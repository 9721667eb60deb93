"""The single writer: every store call of the running daemon goes through one thread.

SQLite allows one writer at a time, and its WAL reset bug makes concurrent writers
unsafe on older libraries; funnelling every call through one thread also keeps the
event loop free while a commit waits for fsync.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from daemon.store import Store

P = ParamSpec("P")
R = TypeVar("R")


class Db:
    """Runs ``Store`` methods on one dedicated thread, awaitable from the event loop."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-writer")

    async def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        """Finish pending calls, then close the store."""
        self._executor.shutdown(wait=True)
        self.store.close()
