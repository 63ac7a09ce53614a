"""The pipeline inside ``qcnode serve``: dispatcher, start-up re-dispatch, embedded workers.

:class:`Pipeline` is entered before :class:`node.serve.Node` and left after it; its
:meth:`Pipeline.on_complete` goes on the node's hook list::

    with Pipeline(settings, config) as pipeline, Node(settings, [pipeline.on_complete]):
        ...

On entry it opens its own ledger connection (safe beside the listener's), starts one
``qcnode worker`` child per queue when no broker URL is configured (the embedded
default), and re-sends every unfinished job from the ledger (a restart after a crash).
Series are prepared speculatively during their quiet period
(:mod:`node.pipeline.speculate`).
With ``[broker] url`` set, workers run elsewhere (``qcnode worker --queues gpu|io``).
This module never imports torch.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

import structlog

from node.config import Settings
from node.ledger import Ledger
from node.pipeline.app import embedded
from node.pipeline.dispatch import Dispatcher
from node.pipeline.embedded import EmbeddedWorkers
from node.reload import ReloadPlan

log = structlog.get_logger(__name__)


class Pipeline:
    """Dispatch completed series to the workers (a context manager; see the module)."""

    def __init__(self, settings: Settings, config: Path | None) -> None:
        self.settings = settings
        self.config = config
        self.dispatcher: Dispatcher | None = None
        self.workers: EmbeddedWorkers | None = None
        self._stack = ExitStack()

    def on_complete(self, series_uid: str, trigger: str) -> None:
        """The completion hook: prepare and enqueue in the background."""
        if self.dispatcher is None:
            raise RuntimeError("pipeline not started")
        self.dispatcher.on_complete(series_uid, trigger)

    def apply(self, plan: ReloadPlan) -> None:
        """Run with reloaded settings (SIGHUP, :mod:`node.reload`).

        The dispatcher picks destinations (hence companions) by the new rules at
        once. The embedded workers read the settings file themselves: when the
        destinations or rules changed they are restarted warm (each finishes its
        running task) — unless the file also changed keys that need a restart of
        the node, which the workers would otherwise take alone (another ledger,
        broker or engine than the node's); they then keep the old ones until then.
        """
        self.settings = plan.settings
        if self.dispatcher is not None:
            self.dispatcher.settings = plan.settings
        if self.workers is None or not plan.changed:
            return
        if plan.restart_needed:
            log.warning("workers_not_reloaded", changed=list(plan.changed),
                        reason="keys that need a restart changed too")
            return
        self.workers.restart()

    def _worker_restarted(self, queue: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.redispatch(queue)

    def __enter__(self) -> Pipeline:
        settings = self.settings
        settings.node.home.mkdir(parents=True, exist_ok=True)
        try:
            ledger = self._stack.enter_context(Ledger.open(settings.ledger_url))
            self.dispatcher = self._stack.enter_context(
                Dispatcher(settings, ledger, speculate=True))
            if embedded(settings):
                self.workers = self._stack.enter_context(
                    EmbeddedWorkers(self.config, on_restart=self._worker_restarted))
            count = self.dispatcher.redispatch()
            log.info("pipeline_started", embedded_workers=self.workers is not None,
                     engine_key=self.dispatcher.engine_key, redispatched=count)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # LIFO: workers stop (finishing their task), the dispatcher drains, the ledger closes.
        self._stack.close()
