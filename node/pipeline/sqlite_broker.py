"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, tuned for latency.

kombu's stock ``sqla+sqlite://`` transport has three properties that hurt here:

* it polls every 1 s per consumer, so each hop (``gpu`` then ``io``) adds up to a second;
  its ``polling_interval`` cannot be set from the transport options, because every
  option is also handed to :func:`sqlalchemy.create_engine`, which rejects it;
* it runs SQLite in rollback-journal mode, where readers and the writer block each
  other (the node and two workers share the file);
* a fetched message is only marked invisible, never removed: the table grows forever.

:class:`Transport` fixes the three: a short polling interval (:data:`POLLING_INTERVAL`,
or the ``polling_interval`` transport option), WAL mode with a busy timeout, and a fetch
that deletes the row in the same ``BEGIN IMMEDIATE`` transaction.

A short interval made idle polling expensive: each poll was a write transaction through
the ORM, ~13 % of a core for the two idle embedded workers, on the cores the listener
receives on. A poll now first asks SQLite whether anything was committed to the file
since the queue was last found empty (``PRAGMA data_version`` on a connection of its
own, a few microseconds) and only then fetches.

Delivery semantics are those of the stock transport: a message is handed to one
consumer once; an unacknowledged message goes back to the queue when the worker
rejects it (``reject_on_worker_lost``: a pool process died) or shuts down cleanly, but
not when the worker's main process is killed (SIGKILL). The ledger covers that case:
the node re-dispatches unfinished jobs when an embedded worker restarts and at start-up
(see :mod:`node.pipeline.embedded` and :meth:`node.pipeline.dispatch.Dispatcher.redispatch`).

Celery selects it with ``broker_transport = "node.pipeline.sqlite_broker:Transport"``
and a plain ``sqlite:///…`` broker URL (see :func:`node.pipeline.app.create_app`).
"""

from __future__ import annotations

import sqlite3
import threading
from json import loads
from queue import Empty
from typing import Any

from kombu.transport import sqlalchemy as kombu_sqla
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import create_engine, event, make_url, text

TRANSPORT_PATH = "node.pipeline.sqlite_broker:Transport"
#: Seconds between polls of an empty queue (kombu's default is 1.0).
POLLING_INTERVAL = 0.05
#: Milliseconds SQLite waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 30_000
#: Transport options consumed by kombu itself, never passed to ``create_engine``.
_KOMBU_OPTIONS = frozenset({
    "queue_tablename", "message_tablename", "callback", "errback", "max_retries",
    "interval_start", "interval_step", "interval_max", "retry_errors", "polling_interval",
})


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # The busy timeout first: switching the journal mode takes a lock, and without a
    # timeout a process starting up beside the others (the node and two workers open
    # the file at once) failed at once with "database is locked".
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class Channel(kombu_sqla.Channel):
    """A kombu SQLAlchemy channel for SQLite: WAL, busy timeout, fetch deletes."""

    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        options = {k: v for k, v in conninfo.transport_options.items()
                   if k not in _KOMBU_OPTIONS}
        engine = create_engine(conninfo.hostname, **options)
        event.listen(engine, "connect", _on_connect)
        return engine

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        self._probe: sqlite3.Connection | None = None  # opened on the first poll
        self._probe_lock = threading.Lock()
        self._idle_at: dict[str, int] = {}  # queue → data_version it was found empty at
        super().__init__(connection, **kwargs)  # type: ignore[no-untyped-call]

    def _data_version(self) -> int | None:
        """SQLite's ``data_version`` seen from a connection of our own: it changes
        whenever any other connection (another process, or this channel's session)
        commits to the file. None when the broker is not a SQLite file."""
        with self._probe_lock:
            if self._probe is None:
                database = make_url(self.connection.client.hostname).database
                if not database or database == ":memory:":
                    return None
                self._probe = sqlite3.connect(database, check_same_thread=False)
            row = self._probe.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        """The oldest message of ``queue``, or :class:`queue.Empty` — without a
        query when nothing was committed since the queue was last found empty."""
        version = self._data_version()
        if version is not None and self._idle_at.get(queue) == version:
            raise Empty()
        try:
            return self._take(queue)
        except Empty:
            if version is not None:  # read before the fetch: later commits fetch again
                self._idle_at[queue] = version
            raise

    def close(self) -> None:
        with self._probe_lock:
            probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()
        super().close()  # type: ignore[no-untyped-call]

    def _take(self, queue: Any) -> Any:
        """Take the oldest message of ``queue`` and delete it, in one write transaction."""
        obj = self._get_or_create(queue)  # type: ignore[no-untyped-call]
        session = self.session
        session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            msg = (session.query(self.message_cls)
                   .filter(self.message_cls.queue_id == obj.id)
                   .filter(self.message_cls.visible != False)  # noqa: E712 - SQL expression
                   .order_by(self.message_cls.sent_at)
                   .order_by(self.message_cls.id)
                   .limit(1)
                   .first())
            if msg is None:
                raise Empty()
            payload = loads(bytes_to_str(msg.payload))  # type: ignore[no-untyped-call]
            session.delete(msg)
            return payload
        finally:
            session.commit()


class Transport(kombu_sqla.Transport):
    """The embedded broker's transport (see the module documentation)."""

    Channel = Channel
    polling_interval = POLLING_INTERVAL
