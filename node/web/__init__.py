"""The node's HTTP side (``[web]``): health, readiness and Prometheus metrics.

Served by ``qcnode serve`` on ``[web] host, port`` (default 127.0.0.1:8480) with
Starlette on uvicorn, in a thread of the serve process (:mod:`node.web.server`):

* ``GET /healthz`` — the process is up (200);
* ``GET /readyz`` — the listener is bound, the ledger and the broker answer and the
  spool disk is above its free-space watermark (200), else 503 with the failing checks;
* ``GET /metrics`` — Prometheus text format (:mod:`node.metrics`, :mod:`node.web.collect`).

It binds a loopback address only: nothing here authenticates a caller yet, so a
non-loopback ``[web] host`` is refused by the configuration check.
"""
