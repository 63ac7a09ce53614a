"""Executing the listener's pre-built ledger statements with as little Python as possible.

:meth:`node.ledger.instances.InstanceAPI.record_instance` runs once per received image
(PS3.4 Annex B) and, on SQLite, in one thread for every association waiting on the group
commit. Through SQLAlchemy Core each statement costs ~60–100 µs of Python (execution
context, cache key, result object) — several times SQLite's own work, and all of it
under the GIL that 20 receiving threads compete for. :class:`SQLiteExecutor` compiles
each statement once (per set of parameter names), applies the column types' bind
processors itself, and runs it on the DBAPI cursor. :class:`CoreExecutor` is the same
interface over a SQLAlchemy connection (PostgreSQL, and the ungrouped path).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from typing import Any, Protocol

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Executable

Params = Mapping[str, Any]


class Executor(Protocol):
    """Runs a statement with named parameters inside an open transaction."""

    def run(self, stmt: Executable, params: Params) -> None: ...
    def first(self, stmt: Executable, params: Params) -> tuple[Any, ...] | None: ...
    def scalar(self, stmt: Executable, params: Params) -> Any: ...


class CoreExecutor:
    """:class:`Executor` over a SQLAlchemy connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def run(self, stmt: Executable, params: Params) -> None:
        self.conn.execute(stmt, dict(params))

    def first(self, stmt: Executable, params: Params) -> tuple[Any, ...] | None:
        row = self.conn.execute(stmt, dict(params)).first()
        return None if row is None else tuple(row)

    def scalar(self, stmt: Executable, params: Params) -> Any:
        return self.conn.execute(stmt, dict(params)).scalar()


class _Compiled:
    __slots__ = ("compiled", "names", "processors", "sql")

    def __init__(self, stmt: Executable, dialect: Dialect, keys: tuple[str, ...]) -> None:
        if not isinstance(stmt, ClauseElement):
            raise TypeError("only Core statements can be compiled")
        compiled: Any = stmt.compile(dialect=dialect, column_keys=list(keys))
        if not compiled.positional:
            raise TypeError("SQLiteExecutor needs a positional (qmark) dialect")
        self.compiled = compiled
        self.sql: str = compiled.string
        self.names: tuple[str, ...] = tuple(compiled.positiontup)
        self.processors: dict[str, Any] = dict(compiled._bind_processors)

    def values(self, params: Params) -> tuple[Any, ...]:
        bound = self.compiled.construct_params(dict(params))
        out = []
        for name in self.names:
            value = bound[name]
            proc = self.processors.get(name)
            out.append(proc(value) if proc is not None and value is not None else value)
        return tuple(out)


class StatementCache:
    """Compiled forms of the hot statements for one SQLite dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._cache: dict[tuple[int, tuple[str, ...]], _Compiled] = {}
        self._keep: list[Executable] = []  # ids stay valid while cached

    def get(self, stmt: Executable, params: Params) -> _Compiled:
        keys = tuple(sorted(params))
        key = (id(stmt), keys)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = _Compiled(stmt, self.dialect, keys)
            self._keep.append(stmt)
        return found


class SQLiteExecutor:
    """:class:`Executor` over a sqlite3 cursor (see the module documentation)."""

    def __init__(self, cursor: sqlite3.Cursor, cache: StatementCache) -> None:
        self.cursor, self.cache = cursor, cache

    def _execute(self, stmt: Executable, params: Params) -> sqlite3.Cursor:
        compiled = self.cache.get(stmt, params)
        return self.cursor.execute(compiled.sql, compiled.values(params))

    def run(self, stmt: Executable, params: Params) -> None:
        self._execute(stmt, params)

    def first(self, stmt: Executable, params: Params) -> tuple[Any, ...] | None:
        row = self._execute(stmt, params).fetchone()
        return None if row is None else tuple(row)

    def scalar(self, stmt: Executable, params: Params) -> Any:
        row = self.first(stmt, params)
        return None if row is None else row[0]

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A savepoint: released on success, rolled back to (and released) on error."""
        self.cursor.execute("SAVEPOINT qcnode_record")
        try:
            yield
        except BaseException:
            self.cursor.execute("ROLLBACK TO qcnode_record")
            self.cursor.execute("RELEASE qcnode_record")
            raise
        self.cursor.execute("RELEASE qcnode_record")


@contextmanager
def sqlite_write_transaction(engine: Engine) -> Iterator[Any]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on a pooled sqlite3 connection (autocommit mode,
    see :func:`node.ledger.db._sqlite_on_connect`); rolled back on any error."""
    raw = engine.raw_connection()
    try:
        with closing(raw.cursor()) as cursor:
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
    finally:
        raw.close()
