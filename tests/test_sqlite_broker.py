"""The embedded broker's transport (node.pipeline.sqlite_broker), on a real SQLite file.

Guaranteed: a consumer polling an empty queue runs no SQL until something is
committed to the broker file (by another process or another connection); a message
published meanwhile is still delivered on the next poll, once, and then gone.
"""

from __future__ import annotations

from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu.connection import Connection
from sqlalchemy import event

from node.pipeline.sqlite_broker import Channel, Transport


def _channel(url: str) -> tuple[Connection, Channel]:
    conn = Connection(url, transport=Transport)
    channel = conn.default_channel
    assert isinstance(channel, Channel)
    return conn, channel


def test_idle_polls_run_no_sql_and_a_new_message_is_still_delivered(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    consumer_conn, consumer = _channel(url)
    producer_conn, producer = _channel(url)
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        statements.append(sql)

    engine, _ = consumer._open()
    event.listen(engine, "before_cursor_execute", count)
    try:
        with pytest.raises(Empty):
            consumer._get("gpu")  # creates the queue, finds it empty
        with pytest.raises(Empty):
            consumer._get("gpu")  # the queue row's commit: one more look
        statements.clear()
        for _ in range(20):
            with pytest.raises(Empty):
                consumer._get("gpu")
        assert statements == []  # idle: not one query

        producer._put("gpu", {"body": "task-1"})
        assert consumer._get("gpu") == {"body": "task-1"}
        assert statements  # the commit was seen and the row fetched
        with pytest.raises(Empty):
            consumer._get("gpu")  # taken once, deleted
        producer._put("io", {"body": "other queue"})
        with pytest.raises(Empty):
            consumer._get("gpu")  # looked (a commit happened), found nothing of its own
        assert consumer._get("io") == {"body": "other queue"}
    finally:
        event.remove(engine, "before_cursor_execute", count)
        consumer_conn.release()
        producer_conn.release()
