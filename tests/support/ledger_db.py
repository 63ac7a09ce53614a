"""Ledger database fixtures: every ledger test runs on SQLite and on PostgreSQL.

PostgreSQL is the server this machine runs (127.0.0.1:5432, database ``test``, trust
auth). Each test gets a fresh schema, selected through the connection's
``search_path``, and drops it afterwards. If the server is not reachable the test
fails (it never skips).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

PG_CONNINFO = os.environ.get(
    "QCNODE_TEST_PG", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_conninfo_ok() -> None:
    try:
        with psycopg.connect(PG_CONNINFO, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_CONNINFO!r} is not reachable: {exc}")


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A SQLAlchemy URL for a fresh, empty PostgreSQL schema (dropped afterwards)."""
    _pg_conninfo_ok()
    schema = f"qcnode_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url
