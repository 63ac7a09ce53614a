"""The listening socket of :mod:`node.receive.acceptor` and the event loop that serves it.

One thread accepts connections and serves all of them (``selectors``: epoll on Linux):
when a socket is readable its bytes go into that connection's buffer and its protocol
coroutine runs until it needs more (:class:`node.receive.acceptor.Connection`). With a thread
per association, twenty concurrent senders meant twenty threads taking turns at the
GIL, each turn a futex wake-up and a context switch — a third of the listener's CPU on
a 2-core machine, and the aggregate rate fell below a single sender's. Writing the
received bytes to the journal runs in this thread; the calls that wait (a record's
``fdatasync`` with the header check before it, an association's ledger row) run in
:data:`OFFLOAD_THREADS` pool threads while the loop serves the other connections, or
inline when there is no other connection to serve (:meth:`AcceptorServer.submit`).

TCP_NODELAY is set on the listening and on every accepted socket (DICOM's request /
response exchange stalls on Nagle's algorithm).

With ``[node] tls_port`` a second listening socket accepts DICOM over TLS
(:mod:`node.receive.tls`): its connections first go through a :class:`node.receive.tls.Handshake` in
this same loop (limits and the ACSE timeout apply to it), then become ordinary
connections over a :class:`node.receive.tls.NonBlockingSSLSocket`.
"""

from __future__ import annotations

import contextlib
import math
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from node import metrics
from node.logs import get_logger
from node.receive.acceptor import AcceptorConfig, Connection, Services
from node.receive.tls import Handshake, TlsPort, failure_reason

log = get_logger(__name__)

#: Receive buffer asked for on each accepted socket.
SOCKET_BUFFER_BYTES = 4 << 20
#: Connections accepted per loop iteration at most (the others wait in the backlog).
ACCEPT_BATCH = 64
#: Threads for the connections' blocking calls (each mostly waits for a flush).
OFFLOAD_THREADS = 4
#: Sockets open beyond ``max_associations``: room for connections still negotiating.
NEGOTIATING_SOCKETS = 16


def listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` (TCP_NODELAY inherited)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class AcceptorServer:
    """Listening socket and the one thread that accepts and serves every connection.

    Limits (an outside fuzz run held every slot with 64 connections sending a byte a
    second from hosts not in ``[[senders]]``, and 320 sockets from 10 hosts):

    * a connection must complete its A-ASSOCIATE-RQ within the ACSE timeout from its
      accept (:class:`node.receive.acceptor.Connection`), whatever it dribbles meanwhile;
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
        max_associations: int, max_per_host: int, tls: TlsPort | None = None,
    ) -> None:
        self.config, self.services = config, services
        _ = config.negotiator  # pynetdicom's supported contexts, built once (~70 ms)
        self.max_associations, self.max_per_host = max_associations, max_per_host
        self.max_sockets = max_associations + NEGOTIATING_SOCKETS
        self.sock = listen(host, port)
        # The TLS port (node.receive.tls): its handshakes in progress, its connections' fds.
        self.tls = tls
        self.tls_sock = listen(host, tls.port) if tls is not None else None
        self._handshakes: dict[int, Handshake] = {}
        self._tls_fds: set[int] = set()
        self._buffered = False  # a TLS connection still has decrypted bytes to serve
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

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the TLS port, if there is one."""
        if self.tls_sock is None:
            return None
        host, port = self.tls_sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Start accepting and serving in a background thread."""
        self._selector.register(self.sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        if self.tls_sock is not None:
            self._selector.register(self.tls_sock, selectors.EVENT_READ, self.tls)
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
        done (:class:`node.receive.acceptor.Offload`). With no other connection to serve
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
                    self._close_tls_port()
                if stopping and (not self._open or time.monotonic() >= self._stop_deadline):
                    break
                for key, events in self._selector.select(self._wait()):
                    self._dispatch(key.data, events)
                self._serve_buffered()
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
            for handshake in list(self._handshakes.values()):
                self._drop(handshake)
            if self.sock.fileno() >= 0:
                self.sock.close()
            self._close_tls_port()
            self._selector.close()

    def _dispatch(self, data: Any, events: int) -> None:
        """Act on one ready socket, told apart by what it was registered with."""
        if data is None:
            self._accept()
        elif data is self._wake_r:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
            self._resume_ready()
        elif isinstance(data, TlsPort):
            self._accept(data)
        elif isinstance(data, Handshake):
            self._handshake(data)
        else:
            self._serve(data, events)

    def _resume_ready(self) -> None:
        while self._ready:
            conn = self._ready.popleft()
            if self._open.get(conn.fd, (None,))[0] is conn:
                conn.resume()
                self._settle(conn.fd, conn)

    def _wait(self) -> float | None:
        """Seconds until the next connection deadline (``None``: nothing to time)."""
        if self._buffered:
            return 0.0
        deadlines = [conn.deadline for conn, _ in self._open.values()
                     if conn.deadline != math.inf]
        deadlines += [handshake.deadline for handshake in self._handshakes.values()]
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
        for handshake in list(self._handshakes.values()):
            if handshake.deadline <= now:
                log.warning("TLS handshake timed out", address=handshake.host)
                metrics.rejected("", handshake.host, "tls_handshake")
                self._drop(handshake)

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
        self._tls_fds.discard(fd)
        self._release_host(host)

    def _release_host(self, host: str) -> None:
        left = self._per_host.get(host, 1) - 1
        if left > 0:
            self._per_host[host] = left
        else:
            self._per_host.pop(host, None)

    # Accepting -------------------------------------------------------------------------------
    def _accept(self, tls: TlsPort | None = None) -> None:
        sock = self.tls_sock if tls is not None and self.tls_sock is not None else self.sock
        for _ in range(ACCEPT_BATCH):
            try:
                client, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the backlog keeps them
                log.error("accept failed", error=exc.strerror)
                return
            self._admit(client, str(addr[0]), tls)

    def _admit(self, client: socket.socket, host: str, tls: TlsPort | None = None) -> None:
        if self._per_host.get(host, 0) >= self.max_per_host:
            log.warning("connection refused", reason="per-host association limit",
                        address=host, limit=self.max_per_host)
            metrics.rejected("", host, "per_host_limit")
            client.close()
            return
        known = self.services.known_host(host)
        negotiating = len(self._open) + len(self._handshakes)
        if negotiating >= self.max_sockets and not (known and self._evict_stranger()):
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
        if tls is not None:
            self._begin_handshake(tls, client, host, False)
            return
        conn = Connection(client, host, self.config, self.services, self._full, self)
        self._open[conn.fd] = (conn, host)
        if not known:
            self._strangers[conn.fd] = conn
        self._settle(conn.fd, conn)

    # The TLS port (node.receive.tls) -------------------------------------------------------------
    def _begin_handshake(self, tls: TlsPort, client: socket.socket, host: str,
                         over: bool) -> None:
        try:
            sock = tls.wrap(client)
        except OSError:
            client.close()
            self._release_host(host)
            return
        handshake = Handshake(sock, host, over, self.config.acse_timeout)
        self._handshakes[handshake.fd] = handshake
        self._handshake(handshake)

    def _handshake(self, handshake: Handshake) -> None:
        """One step of a TLS handshake; once it is done, the connection is served
        like any other (with the certificate's names for the admission check)."""
        try:
            want = handshake.step()
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake failed", address=handshake.host,
                        reason=failure_reason(exc))
            metrics.rejected("", handshake.host, "tls_handshake")
            self._drop(handshake)
            return
        if want:
            if not handshake.events:
                self._selector.register(handshake.fd, want, handshake)
            elif want != handshake.events:
                self._selector.modify(handshake.fd, want, handshake)
            handshake.events = want
            return
        if handshake.events:
            self._selector.unregister(handshake.fd)
        del self._handshakes[handshake.fd]
        assert self.tls is not None  # a handshake comes from the TLS port
        cipher = handshake.sock.cipher()
        log.debug("TLS established", address=handshake.host, version=handshake.sock.version(),
                  cipher=cipher[0] if cipher else None)
        services = self.tls.services_for(handshake.names())
        conn = Connection(handshake.sock, handshake.host, self.config, services,
                          self._full, self)
        self._open[conn.fd] = (conn, handshake.host)
        self._tls_fds.add(conn.fd)
        self._settle(conn.fd, conn)

    def _drop(self, handshake: Handshake) -> None:
        if self._handshakes.pop(handshake.fd, None) is None:
            return
        if handshake.events:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(handshake.fd)
        with contextlib.suppress(OSError):
            handshake.sock.close()
        self._release_host(handshake.host)

    def _serve_buffered(self) -> None:
        """Serve TLS connections whose decrypted bytes wait inside their SSL object:
        epoll sees only the socket. Once per loop turn each (a fast sender cannot
        starve the others); what is still left makes the next ``select`` not wait."""
        self._buffered = False
        for fd in list(self._tls_fds):
            entry = self._open.get(fd)
            if entry is None:
                continue
            conn = entry[0]
            if (conn.events & selectors.EVENT_READ and isinstance(conn.sock, ssl.SSLSocket)
                    and conn.sock.pending()):
                self._serve(conn, selectors.EVENT_READ)
                if fd in self._open and conn.sock.pending():
                    self._buffered = True

    def _close_tls_port(self) -> None:
        if self.tls_sock is not None and self.tls_sock.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self.tls_sock)
            self.tls_sock.close()

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
