"""The listening socket of :mod:`node.acceptor`: accept, limit, one thread per peer.

TCP_NODELAY is set on the listening socket and on every accepted one (DICOM's request /
response exchange stalls on Nagle's algorithm), SO_REUSEPORT when several listener
processes share the port, and a large receive buffer so a sender can keep streaming
while the association thread writes and hashes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from node.acceptor import AcceptorConfig, Connection, Services
from node.logs import get_logger

log = get_logger(__name__)

#: Receive buffer asked for on each accepted socket.
SOCKET_BUFFER_BYTES = 4 << 20


class AcceptorServer:
    """Listening socket, accept thread, one :class:`Connection` thread per peer.

    Connections beyond ``max_per_host`` from one address are closed at once; beyond
    ``max_associations`` in all they get A-ASSOCIATE-RJ (transient, local limit
    exceeded). Both limits count connections, so idle sockets count too, but each one
    is closed after the ACSE timeout if it does not send an A-ASSOCIATE-RQ.
    """

    def __init__(
        self, host: str, port: int, config: AcceptorConfig, services: Services, *,
        max_associations: int, max_per_host: int,
    ) -> None:
        self.config, self.services = config, services
        self.max_associations, self.max_per_host = max_associations, max_per_host
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._per_host: dict[str, int] = {}
        self._open: dict[threading.Thread, socket.socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="qcnode-listener",
                                        daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` bound."""
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Start accepting in a background thread."""
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            self._admit(client, str(addr[0]))

    def _admit(self, client: socket.socket, host: str) -> None:
        with self._lock:
            if self._per_host.get(host, 0) >= self.max_per_host:
                log.warning("connection refused", reason="per-host association limit",
                            address=host, limit=self.max_per_host)
                client.close()
                return
            self._per_host[host] = self._per_host.get(host, 0) + 1
            over = len(self._open) >= self.max_associations
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
            client.setblocking(True)
            conn = Connection(client, host, self.config, self.services, over)
            thread = threading.Thread(target=self._run, args=(conn, host),
                                      name="qcnode-association", daemon=True)
            self._open[thread] = client
        thread.start()

    def _run(self, conn: Connection, host: str) -> None:
        try:
            conn.run()
        finally:
            with self._lock:
                self._open.pop(threading.current_thread(), None)
                left = self._per_host.get(host, 1) - 1
                if left > 0:
                    self._per_host[host] = left
                else:
                    self._per_host.pop(host, None)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting; let associations finish within ``timeout``, then cut them."""
        self._stop.set()
        self._thread.join()
        self.sock.close()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._open)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = list(self._open.items())
        for thread, client in left:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            thread.join(5.0)
