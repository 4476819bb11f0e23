"""The single write path to the index: one thread, one connection, group commit.

Callers hand the writer a function of a connection; it runs queued functions together inside one
``BEGIN IMMEDIATE`` transaction (each in its own savepoint, so one failure does not undo the
others), commits once, then resolves every caller's future.  Concurrent associations thereby
share one commit, and durability does not cost throughput.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from clinicbox.archive.index import connect

log = logging.getLogger(__name__)

WriteFn = Callable[[sqlite3.Connection], Any]
_STOP = object()


class WriterStopped(RuntimeError):
    """The writer is not running; nothing was written."""


class IndexWriter:
    def __init__(self, db_path: Path, *, synchronous: str = "normal", batch_max: int = 256) -> None:
        self.db_path = Path(db_path)
        self.synchronous = synchronous
        self.batch_max = batch_max
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._running = False
        self.commits = 0
        self.writes = 0

    def start(self) -> None:
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="index-writer", daemon=True)
        self._thread.start()
        ready.result()
        self._running = True

    def submit(self, fn: WriteFn) -> Future:
        """Queue ``fn(conn)`` for the next batch; the future resolves after its commit."""
        fut: Future = Future()
        with self._lock:
            if not self._running:
                fut.set_exception(WriterStopped("index writer is stopped"))
                return fut
            self._queue.put((fn, fut))
        return fut

    def call(self, fn: WriteFn, timeout: float | None = None) -> Any:
        """Run ``fn(conn)`` in the writer and wait until it is committed."""
        return self.submit(fn).result(timeout)

    def stop(self) -> None:
        """Commit everything already queued, then stop the thread."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join()

    def _run(self, ready: Future) -> None:
        try:
            conn = connect(self.db_path, synchronous=self.synchronous)
        except Exception as exc:  # pragma: no cover - reported to start()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self.batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list) -> None:
        outcomes = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                conn.execute("SAVEPOINT item")
                try:
                    result = fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO item")
                    conn.execute("RELEASE item")
                    outcomes.append((fut, None, exc))
                else:
                    conn.execute("RELEASE item")
                    outcomes.append((fut, result, None))
            conn.execute("COMMIT")
        except Exception as exc:
            log.error("index commit of %d writes failed: %s", len(batch), exc)
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for _fn, fut in batch:
                fut.set_exception(exc)
            return
        self.commits += 1
        self.writes += len(batch)
        for fut, result, exc in outcomes:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
