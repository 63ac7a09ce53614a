"""Shared plumbing of the ledger's API classes: engine, transactions, dialect inserts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite

from node.ledger.db import WRITE_OPTION, create_ledger_engine, upgrade


class LedgerError(Exception):
    """A ledger operation could not be done as asked."""


class VersionConflict(LedgerError):
    """``(sop_instance_uid, version)`` is already recorded with different bytes."""


class InvalidTransition(LedgerError):
    """A state change that the state machine does not allow."""


class NotFound(LedgerError):
    """No such series, job or delivery."""


class LedgerBase:
    """Owns the engine; gives read and write transactions to the API mixins."""

    def __init__(self, url: str) -> None:
        """Connect to the ledger at ``url`` (no migration: see :meth:`open`)."""
        self.url = url
        self.engine: Engine = create_ledger_engine(url)
        self._write_engine = self.engine.execution_options(**{WRITE_OPTION: True})
        self._dialect = self.engine.dialect.name
        self._write_lock = threading.Lock() if self._dialect == "sqlite" else None
        self._study_ids: dict[str, int] = {}

    @classmethod
    def open(cls, url: str) -> Self:
        """Migrate the schema at ``url`` to the newest revision, then connect."""
        ledger = cls(url)
        try:
            upgrade(ledger.engine)
        except BaseException:
            ledger.close()
            raise
        return ledger

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A writing transaction (``BEGIN IMMEDIATE`` on SQLite), committed on exit."""
        if self._write_lock is None:
            with self._write_engine.connect() as conn, conn.begin():
                yield conn
            return
        # SQLite: queue this process's writers on a lock that wakes the next one at
        # once; SQLite's own busy handler sleeps in growing steps (up to 100 ms) and
        # is left for contention between processes.
        with self._write_lock, self._write_unlocked() as conn:
            yield conn

    @contextmanager
    def _write_unlocked(self) -> Iterator[Connection]:
        """A writing transaction; on SQLite the caller holds ``_write_lock``."""
        with self._write_engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction (a consistent snapshot)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _insert(self, entity: Any) -> Any:
        """The dialect's INSERT (with ``on_conflict_do_nothing``) for ``entity``."""
        if self._dialect == "postgresql":
            return postgresql.insert(entity)
        if self._dialect == "sqlite":
            return sqlite.insert(entity)
        raise LedgerError(f"unsupported database dialect {self._dialect!r}")
