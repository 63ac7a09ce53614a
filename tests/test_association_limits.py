"""Slow and unadmitted connections cannot lock an admitted sender out (issue 16, fuzz run).

Raw sockets dribble an A-ASSOCIATE-RQ a byte at a time from 127.0.0.2, 127.0.0.3, …
(Linux routes all of 127/8 to lo: each address is another "host", none of them in
``[[senders]]``), while DCMTK echoscu / storescu from 127.0.0.1, the admitted host,
must still be served at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from node.receive.acceptor_server import NEGOTIATING_SOCKETS
from node.receive.scp import Listener
from tests.support.dcmtk import echoscu, storescu, successes, write_ct_series
from tests.support.listener import make_listener
from tests.support.net import wait_for
from tests.test_acceptor import _associate_rq

MAX_ASSOCIATIONS = 4
STRANGER_HOSTS = 10
PER_STRANGER = 8  # 80 sockets: more than max_associations + NEGOTIATING_SOCKETS


def _listener(tmp_path: Path, acse_timeout: float) -> Listener:
    return make_listener(tmp_path, acse_timeout=acse_timeout,
                         max_associations=MAX_ASSOCIATIONS)


@contextlib.contextmanager
def _running(listener: Listener) -> Iterator[Listener]:
    listener.start()
    try:
        yield listener
    finally:
        listener.stop(5.0)


def _connect(address: tuple[str, int], source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(address)
    sock.setblocking(False)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(64) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


class Dribbler:
    """Sends the next byte of an A-ASSOCIATE-RQ on each socket every ``interval``."""

    def __init__(self, sockets: list[socket.socket], interval: float) -> None:
        self.sockets, self.interval = sockets, interval
        self.rq = _associate_rq(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Dribbler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.sockets:
            sock.close()

    def _run(self) -> None:
        sent = 0
        while not self._stop.wait(self.interval) and sent < len(self.rq) - 1:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.send(self.rq[sent:sent + 1])
            sent += 1

    def open_count(self) -> int:
        return sum(1 for sock in self.sockets if not _closed_by_peer(sock))


def _strangers(address: tuple[str, int], count: int) -> list[socket.socket]:
    """``count`` connections spread over :data:`STRANGER_HOSTS` source addresses."""
    return [_connect(address, f"127.0.0.{2 + i % STRANGER_HOSTS}") for i in range(count)]


def test_strangers_dribbling_cannot_take_an_admitted_senders_slot(tmp_path: Path) -> None:
    """Before: every connection counted against max_associations, so 12 negotiating
    strangers got echoscu A-ASSOCIATE-RJ "local limit exceeded"; and all 80 sockets
    were accepted and held (32 per host allowed)."""
    files = write_ct_series(tmp_path / "ct", 2)
    with _running(_listener(tmp_path / "home", acse_timeout=30.0)) as listener:
        address = listener.address
        with Dribbler(_strangers(address, 3 * MAX_ASSOCIATIONS), interval=0.5):
            echo = echoscu(address[1])
            assert echo.returncode == 0, echo.stdout + echo.stderr
            with Dribbler(_strangers(address, STRANGER_HOSTS * PER_STRANGER),
                          interval=0.5) as many:
                cap = MAX_ASSOCIATIONS + NEGOTIATING_SOCKETS
                wait_for(lambda: many.open_count() <= cap, timeout=10,
                         what=f"at most {cap} sockets left open")
                start = time.monotonic()
                echo = echoscu(address[1])
                assert echo.returncode == 0, echo.stdout + echo.stderr
                stored = storescu(address[1], files)
                assert sorted(successes(stored.stdout + stored.stderr)) == sorted(files), (
                    stored.stdout + stored.stderr)
                assert time.monotonic() - start < 10  # promptly: not after the strangers


def test_the_associate_request_deadline_runs_from_the_accept(tmp_path: Path) -> None:
    """Before: each byte re-armed the ACSE timer; a peer sending a byte every 0.2 s
    kept its connection for as long as it went on."""
    acse_timeout = 1.5
    with _running(_listener(tmp_path / "home", acse_timeout=acse_timeout)) as listener:
        sock = _connect(listener.address, "127.0.0.1")  # even an admitted host
        start = time.monotonic()
        with Dribbler([sock], interval=0.2) as dribbler:
            wait_for(lambda: dribbler.open_count() == 0, timeout=acse_timeout + 3,
                     what="connection closed at the ACSE deadline")
        assert time.monotonic() - start < acse_timeout + 3
