"""``qcnode worker --queues gpu|io|gpu,io``: a Celery worker for pipeline stages.

Runs on any host that reaches the broker and the ledger (PostgreSQL in a multi-host
site); it needs no spool. ``gpu`` runs with prefetch 1 (one long task at a time); with
``[engine] batch_series = N > 1`` a gpu-only worker runs N task threads (threads pool)
whose series the engine assesses together (:mod:`inference.batcher`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from node.pipeline.app import GPU, IO, create_app, queue_name

EXIT_USAGE = 2


def main(args: argparse.Namespace) -> int:
    """Start a worker consuming ``args.queues``; returns when it stops."""
    from node.config import ConfigError, load_settings
    from node.logs import celery_logging, configure_logging
    from node.pipeline.tasks import register

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    stages = [q.strip() for q in str(args.queues).split(",") if q.strip()]
    unknown = [q for q in stages if q not in (GPU, IO)]
    if not stages or unknown:
        print(f"--queues takes gpu, io or gpu,io (not {args.queues!r})", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.logging.level, settings.logging.json_output)
    celery_logging(settings.logging.level)
    # highdicom narrates every copied module at INFO; keep its warnings only.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING,
                                                logging.getLevelName(settings.logging.level)))
    app = create_app(settings)
    register(app, settings)
    queues = ",".join(queue_name(settings, q) for q in stages)
    pool, concurrency = "prefork", int(args.concurrency)
    if stages == [GPU] and settings.engine.batch_series > 1:
        pool, concurrency = "threads", max(concurrency, settings.engine.batch_series)
    # --quiet: no start-up banner on stdout (plain text, around the log's JSON lines);
    # the worker's ``ready`` line is logged.
    argv = ["--quiet", "worker", "--queues", queues, "--concurrency", str(concurrency),
            "--pool", pool, "--prefetch-multiplier", "1", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "--loglevel",
            settings.logging.level, "--hostname", f"qcnode-{'-'.join(stages)}@%h"]
    app.worker_main(argv)
    return 0
