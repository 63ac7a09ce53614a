"""The listening socket of :mod:`node.acceptor` and the event loop that serves it.

One thread accepts connections and serves all of them (``selectors``: epoll on Linux):
when a socket is readable its bytes go into that connection's buffer and its protocol
coroutine runs until it needs more (:class:`node.acceptor.Connection`). With a thread
per association, twenty concurrent senders meant twenty threads taking turns at the
GIL, each turn a futex wake-up and a context switch — a third of the listener's CPU on
a 2-core machine, and the aggregate rate fell below a single sender's. Writing the
received bytes to the journal runs in this thread; the calls that wait (a record's
``fdatasync`` with the header check before it, an association's ledger row) run in
:data:`OFFLOAD_THREADS` pool threads while the loop serves the other connections, or
inline when there is no other connection to serve (:meth:`AcceptorServer.submit`).

TCP_NODELAY is set on the listening and on every accepted socket (DICOM's request /
response exchange stalls on Nagle's algorithm).
"""

from __future__ import annotations

import contextlib
import math
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from node import metrics
from node.acceptor import AcceptorConfig, Connection, Services
from node.logs import get_logger

log = get_logger(__name__)

#: Receive buffer asked for on each accepted socket.
SOCKET_BUFFER_BYTES = 4 << 20
#: Connections accepted per loop iteration at most (the others wait in the backlog).
ACCEPT_BATCH = 64
#: Threads for the connections' blocking calls (each mostly waits for a flush).
OFFLOAD_THREADS = 4
#: Sockets open beyond ``max_associations``: room for connections still negotiating.
NEGOTIATING_SOCKETS = 16


class AcceptorServer:
    """Listening socket and the one thread that accepts and serves every connection.

    Limits (an outside fuzz run held every slot with 64 connections sending a byte a
    second from hosts not in ``[[senders]]``, and 320 sockets from 10 hosts):

    * a connection must complete its A-ASSOCIATE-RQ within the ACSE timeout from its
      accept (:class:`node.acceptor.Connection`), whatever it dribbles meanwhile;
    * ``max_associations`` counts *established* associations only: beyond it an
      A-ASSOCIATE-RQ gets A-ASSOCIATE-RJ (transient, local limit exceeded), so
      negotiating sockets never take an admitted sender's slot;
    * at most ``max_associations`` + :data:`NEGOTIATING_SOCKETS` sockets are open;
      beyond, a connection from a host some ``[[senders]]`` entry names closes the
      oldest still-negotiating connection of a host none names, and any other new
      connection is closed at once (hosts are known at accept, AE titles only later);
    * connections beyond ``max_per_host`` from one address are closed at once.
    """

    def __init__(
        self, host: str, port: int, config: AcceptorConfig, services: Services, *,
        max_associations: int, max_per_host: int,
    ) -> None:
        self.config, self.services = config, services
        _ = config.negotiator  # pynetdicom's supported contexts, built once (~70 ms)
        self.max_associations, self.max_per_host = max_associations, max_per_host
        self.max_sockets = max_associations + NEGOTIATING_SOCKETS
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._per_host: dict[str, int] = {}
        self._open: dict[int, tuple[Connection, str]] = {}  # fd → (connection, host)
        self._strangers: dict[int, Connection] = {}  # from hosts no sender names, oldest first
        self._stop = threading.Event()
        self._stop_deadline = 0.0
        self._pool = ThreadPoolExecutor(OFFLOAD_THREADS, thread_name_prefix="qcnode-store")
        self._ready: deque[Connection] = deque()  # their off-loop call is done
        self._address = self.sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._loop, name="qcnode-listener",
                                        daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` bound."""
        host, port = self._address
        return str(host), int(port)

    def start(self) -> None:
        """Start accepting and serving in a background thread."""
        self._selector.register(self.sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting; let associations finish within ``timeout``, then cut them."""
        self._stop_deadline = time.monotonic() + timeout
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout + 10.0)
        for s in (self._wake_r, self._wake_w):
            s.close()

    def submit(self, conn: Connection, call: Callable[[], Any]) -> Future[Any]:
        """Run ``call`` in a pool thread; the loop resumes the connection when it is
        done (:class:`node.acceptor.Offload`). With no other connection to serve
        meanwhile, run it here and now: a hand-off to a pool thread and back costs two
        wake-ups per image (measured with one sender: 730 → 250–490 img/s)."""
        if len(self._open) <= 1:
            done: Future[Any] = Future()
            try:
                done.set_result(call())
            except Exception as exc:  # noqa: BLE001 — raised in the connection's coroutine
                done.set_exception(exc)
            return done
        future = self._pool.submit(call)
        future.add_done_callback(lambda _: self._wake(conn))
        return future

    def _wake(self, conn: Connection) -> None:
        self._ready.append(conn)
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"r")

    # The loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                stopping = self._stop.is_set()
                if stopping and self.sock.fileno() >= 0:
                    self._selector.unregister(self.sock)
                    self.sock.close()
                if stopping and (not self._open or time.monotonic() >= self._stop_deadline):
                    break
                for key, events in self._selector.select(self._wait()):
                    if key.data is None:
                        self._accept()
                    elif key.data is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        self._resume_ready()
                    else:
                        self._serve(key.data, events)
                self._expire()
        except Exception:  # a bug here would silence the node: make it loud
            log.exception("listener loop failed")
            raise
        finally:
            self._pool.shutdown(wait=True)  # no call may run in a context we abort
            self._resume_ready()
            for fd in list(self._open):
                conn, _ = self._open[fd]
                conn.expire()  # aborts established associations, closes the socket
                self._forget(fd)
            if self.sock.fileno() >= 0:
                self.sock.close()
            self._selector.close()

    def _resume_ready(self) -> None:
        while self._ready:
            conn = self._ready.popleft()
            if self._open.get(conn.fd, (None,))[0] is conn:
                conn.resume()
                self._settle(conn.fd, conn)

    def _wait(self) -> float | None:
        """Seconds until the next connection deadline (``None``: nothing to time)."""
        deadlines = [conn.deadline for conn, _ in self._open.values()
                     if conn.deadline != math.inf]
        if self._stop.is_set():
            deadlines.append(self._stop_deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, (conn, _) in list(self._open.items()):
            if conn.deadline <= now:
                conn.expire()
                self._settle(fd, conn)

    def _serve(self, conn: Connection, events: int) -> None:
        fd = conn.fd
        if events & selectors.EVENT_WRITE:
            conn.flush()
        if events & selectors.EVENT_READ and not conn.done and not conn.busy:
            try:
                count = conn.sock.recv_into(conn.view)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                conn.failed(exc)
            else:
                conn.received(count)
        self._settle(fd, conn)

    def _settle(self, fd: int, conn: Connection) -> None:
        """Forget a finished connection; watch for writability while output waits."""
        if conn.done:
            self._forget(fd)
            return
        want = ((0 if conn.busy else selectors.EVENT_READ)
                | (selectors.EVENT_WRITE if conn.outbox else 0))
        if want == conn.events:
            return
        if not conn.events:
            self._selector.register(fd, want, conn)
        elif not want:
            self._selector.unregister(fd)
        else:
            self._selector.modify(fd, want, conn)
        conn.events = want

    def _forget(self, fd: int) -> None:
        conn, host = self._open.pop(fd)
        self._strangers.pop(fd, None)
        if conn.events:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)
        with contextlib.suppress(OSError):
            conn.sock.close()
        left = self._per_host.get(host, 1) - 1
        if left > 0:
            self._per_host[host] = left
        else:
            self._per_host.pop(host, None)

    # Accepting -------------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the backlog keeps them
                log.error("accept failed", error=exc.strerror)
                return
            self._admit(client, str(addr[0]))

    def _admit(self, client: socket.socket, host: str) -> None:
        if self._per_host.get(host, 0) >= self.max_per_host:
            log.warning("connection refused", reason="per-host association limit",
                        address=host, limit=self.max_per_host)
            metrics.rejected("", host, "per_host_limit")
            client.close()
            return
        known = self.services.known_host(host)
        if len(self._open) >= self.max_sockets and not (known and self._evict_stranger()):
            log.warning("connection refused", reason="socket limit", address=host,
                        limit=self.max_sockets)
            metrics.rejected("", host, "socket_limit")
            client.close()
            return
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
            client.setblocking(False)
        except OSError:
            client.close()
            return
        self._per_host[host] = self._per_host.get(host, 0) + 1
        conn = Connection(client, host, self.config, self.services, self._full, self)
        self._open[conn.fd] = (conn, host)
        if not known:
            self._strangers[conn.fd] = conn
        self._settle(conn.fd, conn)

    def _full(self) -> bool:
        """True when ``max_associations`` associations are established."""
        established = sum(1 for conn, _ in self._open.values() if conn.established)
        return established >= self.max_associations

    def _evict_stranger(self) -> bool:
        """Close the oldest still-negotiating connection from a host no ``[[senders]]``
        entry names; False when there is none."""
        for fd, conn in self._strangers.items():
            if not conn.established and not conn.busy:  # busy: its RQ is being decoded
                log.warning("connection closed", reason="socket limit: room for a sender",
                            address=conn.address)
                metrics.rejected("", conn.address, "socket_limit")
                conn.expire()
                self._settle(fd, conn)
                return True
        return False
