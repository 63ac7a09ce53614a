"""The Starlette application: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from node.config import Settings
from node.ledger import Ledger
from node.logs import get_logger
from node.metrics import MULTIPROC_ENV
from node.web.api import ApiContext, create_api
from node.web.collect import StateCollector, watermark_bytes

log = get_logger(__name__)
HTTP_OK = 200
HTTP_UNAVAILABLE = 503


@dataclass(frozen=True)
class NodeView:
    """What the web side may look at of the running node (callables: it may change)."""

    settings: Callable[[], Settings]
    ledger: Callable[[], Ledger | None]
    listening: Callable[[], tuple[str, int] | None]
    depths: Callable[[Settings], dict[str, int | None]]
    api: ApiContext | None = None


def readiness(view: NodeView, collector: StateCollector) -> dict[str, str | None]:
    """Each check's problem in words, None where it passes."""
    settings = view.settings()
    checks: dict[str, str | None] = {}
    checks["listener"] = None if view.listening() else "the DICOM listener is not bound"
    ledger = view.ledger()
    try:
        if ledger is None:
            raise RuntimeError("not open")
        ledger.series_counts()
        checks["ledger"] = None
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["ledger"] = f"the ledger does not answer ({type(exc).__name__})"
    depths = collector.queue_depths(settings)
    reachable = any(v is not None for v in depths.values())
    checks["broker"] = None if reachable else "the broker does not answer"
    where = settings.spool_dir if settings.spool_dir.exists() else settings.node.home
    usage = shutil.disk_usage(where)
    floor = watermark_bytes(settings, usage.total)
    checks["disk"] = None if usage.free > floor else (
        f"spool disk below its watermark ({usage.free} bytes free, {floor} needed): "
        "images are refused with 0xA700")
    return checks


def create_app(view: NodeView) -> Starlette:
    """The web application over ``view``."""
    import os

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    collector = StateCollector(view.settings, view.ledger, view.depths)
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # the listener's and the embedded workers' counts
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    registry.register(collector)

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        checks = await run_in_threadpool(readiness, view, collector)
        failing = {name: why for name, why in checks.items() if why}
        body = {"status": "ready" if not failing else "not ready",
                "checks": {name: why or "ok" for name, why in checks.items()}}
        return JSONResponse(body, status_code=HTTP_UNAVAILABLE if failing else HTTP_OK)

    async def metrics(_request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        data = await run_in_threadpool(generate_latest, registry)
        return PlainTextResponse(data, media_type=CONTENT_TYPE_LATEST)

    routes: list[Route | Mount] = [
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
    ]
    if view.api is not None:
        routes.append(Mount("/api", app=create_api(view.api)))
        from node.web.console import ConsoleContext, create_console

        routes += create_console(ConsoleContext(
            view, lambda: collector.queue_depths(view.settings())))
    return Starlette(routes=routes)
