"""An in-process :class:`node.receive.scp.Listener` on a free loopback port, for tests of
the receive path that need no ``qcnode serve`` (no ledger: ``ledger=None``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from node.config import Settings
from node.receive.scp import Listener
from node.store.spool import Spool


def make_listener(home: Path, **node: Any) -> Listener:
    """A listener (not started) as AE QCNODE, admitting any AE from 127.0.0.1, no disk
    watermark; ``node`` overrides ``[node]`` keys (timeouts, limits)."""
    settings = Settings.model_validate({
        "node": {"ae_title": "QCNODE", "host": "127.0.0.1", "port": 0, "home": str(home),
                 "acse_timeout": 2.0, "network_timeout": 30.0, **node},
        "senders": [{"ae_title": "*", "host": "127.0.0.1"}],
        "spool": {"min_free_bytes": 0, "min_free_percent": 0.0},
    })
    return Listener(settings, Spool(settings.spool_dir, home), None)


@contextmanager
def running_listener(home: Path, **node: Any) -> Iterator[Listener]:
    """:func:`make_listener`, started, stopped on exit."""
    scp = make_listener(home, **node)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop(5.0)
