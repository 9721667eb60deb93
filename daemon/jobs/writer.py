"""The single writer: every state change of the running daemon is committed on one thread.

SQLite allows one writer at a time, and its WAL reset bug makes concurrent writers
unsafe on older libraries. Calls made while a commit is under way are run together in
the next transaction (group commit): one fsync for many small state changes. A caller's
await returns only after its change is committed, and the event loop never waits for a
disk or a database server meanwhile.

PostgreSQL aborts a whole transaction at the first failed statement, where SQLite only
fails that statement; so when a call of a batch fails in the database, the batch is
rolled back and its calls run again one transaction each, and one call's error never
takes the others' changes with it. Database failures reach the caller as
``StateUnavailable`` (a full disk, an I/O error, a lost server): the pipeline and
intake wait and try again, and never import SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from daemon.errors import StateUnavailable
from daemon.jobs.store import Store

P = ParamSpec("P")
R = TypeVar("R")
MAX_BATCH = 128


@dataclass
class _Call:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    outcome: tuple[bool, Any] = field(default=(False, None))


class _RollBack(Exception):
    """Internal: undo a batch in which a call failed in the database."""


def _translated(exc: BaseException) -> BaseException:
    """A database failure as the project's error; anything else as it is."""
    if isinstance(exc, SQLAlchemyError):
        reason = str(exc).splitlines()[0][:200]
        error = StateUnavailable(f"the state database failed: {reason}")
        error.__cause__ = exc
        return error
    return exc


def _settle(calls: list[_Call]) -> None:
    for call in calls:
        if call.future.cancelled():
            continue
        ok, value = call.outcome
        if ok:
            call.future.set_result(value)
        else:
            call.future.set_exception(_translated(value))


class Writer:
    """Runs ``Store`` methods in group commits on one thread, awaitable from the loop."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="db-writer", daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` in the next group commit; return once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.put(_Call(lambda: fn(*args, **kwargs), loop, future))
        return await future

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            self._run(batch)
            if stop:
                return

    def _collect(self, first: _Call) -> tuple[list[_Call], bool]:
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _run(self, batch: list[_Call]) -> None:
        if not self._run_together(batch) and len(batch) > 1:
            for call in batch:
                self._run_together([call])
        by_loop: dict[asyncio.AbstractEventLoop, list[_Call]] = {}
        for call in batch:
            by_loop.setdefault(call.loop, []).append(call)
        for loop, calls in by_loop.items():
            # one wake-up per batch, not per call
            try:
                loop.call_soon_threadsafe(_settle, calls)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                continue

    def _run_together(self, batch: list[_Call]) -> bool:
        """Run ``batch`` in one transaction; False when it was rolled back because a
        call failed in the database (the calls are then to be run again one by one)."""
        try:
            with self.store.batch():
                for call in batch:
                    try:
                        call.outcome = (True, call.fn())
                    except DBAPIError as exc:
                        call.outcome = (False, exc)
                        raise _RollBack from exc
                    except Exception as exc:
                        call.outcome = (False, exc)
        except _RollBack:
            return False
        except Exception as exc:  # the commit itself failed: nothing of the batch holds
            for call in batch:
                call.outcome = (False, exc)
        return True

    def close(self) -> None:
        """Finish pending calls, then close the store."""
        self._queue.put(None)
        self._thread.join(timeout=30)
        self.store.close()
