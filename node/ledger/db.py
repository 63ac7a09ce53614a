"""Database engines for the ledger and the Alembic migration runner.

SQLite (the default) is used from many threads and possibly several listener
processes at once, so every connection gets:

``journal_mode=WAL``
    readers never block the writer and vice versa.
``busy_timeout``
    a writer waits for the lock instead of failing with "database is locked".
``synchronous=FULL``
    In WAL mode ``NORMAL`` survives a crash of the *process* but a power loss can roll
    back the last commits; the C-STORE response (PS3.4 B.2.3, Success) is sent after
    :meth:`~node.ledger.Ledger.record_instance` returns, so an acknowledged image must
    survive a power loss too: FULL syncs the WAL at each commit.
``BEGIN IMMEDIATE`` for writing transactions
    a deferred transaction that reads first and then writes can fail with
    ``SQLITE_BUSY`` at once (busy_timeout does not apply to a lock upgrade in WAL
    mode); taking the write lock at ``BEGIN`` makes writers queue instead.

Migrations run from the installed package (no ``alembic.ini`` needed): the script
location is this package's ``migrations`` directory.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
#: PostgreSQL advisory lock key held while migrating ("qcnode" in ASCII).
MIGRATION_LOCK = 0x7163_6E6F_6465
#: Execution option asking for ``BEGIN IMMEDIATE`` on SQLite.
WRITE_OPTION = "qcnode_write"


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself (the driver's own
    # transaction handling would defer it and cannot take the write lock up front).
    dbapi_connection.isolation_level = None
    with closing(dbapi_connection.cursor()) as cursor:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")


def _sqlite_on_begin(conn: Connection) -> None:
    if conn.get_execution_options().get(WRITE_OPTION):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def create_ledger_engine(url: str) -> Engine:
    """An engine for ``url`` with the ledger's connection settings (see module doc)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=8,
            max_overflow=32,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(parsed, pool_pre_ping=True, pool_size=8, max_overflow=32)


def alembic_config(connection: Connection) -> Config:
    """An Alembic configuration that migrates over ``connection`` (no ini file)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _serialize_migrations(connection: Connection) -> None:
    """Make concurrent migrations (several processes starting at once) take turns.

    SQLite: the transaction starts with ``BEGIN IMMEDIATE`` (the write lock).
    PostgreSQL: a transaction-scoped advisory lock; the second process then finds the
    schema at head instead of failing on a half-created table.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    else:
        connection.execute(text("SELECT 1"))  # begins the (immediate) transaction


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema behind ``engine`` to ``revision`` (Alembic ``upgrade``)."""
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as connection:
        _serialize_migrations(connection)
        command.upgrade(alembic_config(connection), revision)
        connection.commit()


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema behind ``engine`` back to ``revision`` (Alembic ``downgrade``)."""
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as connection:
        command.downgrade(alembic_config(connection), revision)
        connection.commit()
