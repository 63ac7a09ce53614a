"""The web console: server-rendered pages (Jinja templates, no JavaScript build step).

Overview (series by state, queues, journal backlog, disk against its watermark),
series (description, number, modality, state, score, trigger), a series' report as the
radiologist reads it, failures with their last error and a retry button, destinations
with a C-ECHO button (and the commitment check), and who may send — with the callers
rejected in the last 24 hours, so an admin sees a misconfigured scanner — and a form to
admit one more. The same accounts as the API (HTTP Basic: the browser asks); the
buttons need the admin role and a same-origin request. A retry and an echo run the
same code as ``qcnode retry`` and ``qcnode echo`` (as those commands, in a subprocess).
"""

from __future__ import annotations

import base64
import datetime as dt
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from inference.result import AssessmentResult
from node import audit_log, metrics
from node.config import ConfigError
from node.ledger import NotFound, SeriesState
from node.logs import get_logger
from node.status import build_report
from node.web.auth import SESSION_COOKIE, Sessions, User, cross_site
from node.web.collect import journal_backlog, watermark_bytes

if TYPE_CHECKING:
    from node.web.app import NodeView

log = get_logger(__name__)
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
HTTP_UNAUTHORIZED, HTTP_FORBIDDEN, HTTP_SEE_OTHER = 401, 403, 303
COMMAND_TIMEOUT = 120.0


@dataclass(frozen=True)
class ConsoleContext:
    """What the console reads and acts on (see :class:`node.web.app.NodeView`)."""

    view: NodeView
    depths: Callable[[], dict[str, int | None]]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _report_lines(result: AssessmentResult) -> list[str]:
    """The report's text as the Text SR companion words it (slices by UID here: the
    console reads no images)."""
    from sr_writer import prose

    lines = [prose.series_label(result), prose.scale_line(), "", result.explanation, ""]
    lines += [prose.finding_line(f, {}) for f in result.findings]
    lines += [prose.evidence_line(m, {}) for m in result.evidence]
    lines += [f"Note: {n}" for n in result.notes]
    lines.append(prose.engine_line(result.engine))
    return lines


class Console:
    """The console's pages and actions over a running node."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx
        self.view = ctx.view
        if ctx.view.api is None:
            raise ValueError("the console needs the API's accounts and configuration store")
        self.api = ctx.view.api
        settings = ctx.view.settings()
        self.sessions = Sessions(settings.node.home, settings.web.session_minutes)

    async def who(self, request: Request) -> User | Response:
        """The signed-in user (session cookie, or HTTP Basic for scripts), or the answer
        that refuses the request: to the sign-in page, 401, or 403."""
        session = self.sessions.check(request.cookies.get(SESSION_COOKIE), time.time())
        user, csrf = session if session is not None else (None, None)
        if user is None:
            user = self.api.accounts.check(request.headers.get("authorization"))
        if user is None:
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                return RedirectResponse(f"/login?{urlencode({'next': request.url.path})}",
                                        HTTP_SEE_OTHER)
            self.api.refused("no_account" if not self.api.accounts.any() else "bad_credentials")
            return Response("qcnode: sign in (create an account with `qcnode user add`)",
                            HTTP_UNAUTHORIZED,
                            headers={"WWW-Authenticate": 'Basic realm="qcnode"'})
        request.state.csrf = csrf
        if request.method == "POST":
            if cross_site({k.lower(): v for k, v in request.headers.items()},
                          request.headers.get("host")):
                self.api.refused("cross_site")
                return Response("cross-site request refused", HTTP_FORBIDDEN)
            if csrf is not None and (await request.form()).get("csrf") != csrf:
                self.api.refused("csrf")
                return Response("this form has expired: reload the page", HTTP_FORBIDDEN)
            if user.role != "admin" and request.url.path != "/logout":
                self.api.refused("role")
                return Response("this needs the admin role", HTTP_FORBIDDEN)
        return user

    async def login_page(self, request: Request) -> Response:
        return TEMPLATES.TemplateResponse(request, "login.html", {
            "next": request.query_params.get("next", "/"), "error": None})

    async def login(self, request: Request) -> Response:
        """Sign in with a form: a session cookie that expires ``[web] session_minutes``
        later (HttpOnly, SameSite=Strict, Secure over HTTPS)."""
        form = await request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        credentials = "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()
        user = self.api.accounts.check(credentials)
        audit_log.api_login(credentials, request.client.host if request.client else "",
                            user.name if user else None)  # the ATNA log, if configured
        target = str(form.get("next") or "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if user is None:
            self.api.refused("bad_credentials")
            return TEMPLATES.TemplateResponse(request, "login.html", {
                "next": target, "error": "Unknown user or wrong password."},
                status_code=HTTP_UNAUTHORIZED)
        response = RedirectResponse(target, HTTP_SEE_OTHER)
        response.set_cookie(SESSION_COOKIE, self.sessions.issue(user, time.time()),
                            max_age=int(self.sessions.seconds), httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        log.info("console_sign_in", user=user.name)
        return response

    async def logout(self, request: Request) -> Response:
        user = await self.who(request)
        if isinstance(user, Response):
            return user
        response = RedirectResponse("/login", HTTP_SEE_OTHER)
        response.delete_cookie(SESSION_COOKIE)
        return response

    def page(self, request: Request, name: str, user: User, **values: Any) -> Response:
        context = {"title": name, "page": request.url.path, "user": user,
                   "admin": user.role == "admin", "csrf": getattr(request.state, "csrf", None),
                   "message": request.query_params.get("message"), **values}
        return TEMPLATES.TemplateResponse(request, f"{name}.html", context)

    def ledger(self) -> Any:
        found = self.view.ledger()
        if found is None:
            raise RuntimeError("the ledger is not open")
        return found

    async def overview(self, request: Request) -> Response:
        user = await self.who(request)
        if isinstance(user, Response):
            return user
        settings = self.view.settings()
        report = build_report(self.ledger(), limit=1)
        usage = shutil.disk_usage(settings.spool_dir if settings.spool_dir.exists()
                                  else settings.node.home)
        floor = watermark_bytes(settings, usage.total)
        disk = {"free": _size(usage.free), "total": _size(usage.total),
                "watermark": _size(floor), "low": usage.free <= floor}
        return self.page(request, "overview", user, counts=report["counts"],
                    queues={k: v for k, v in self.ctx.depths().items() if v is not None},
                    backlog=journal_backlog(settings), disk=disk,
                    oldest=report["oldest_waiting"])

    async def series(self, request: Request) -> Response:
        user = await self.who(request)
        if isinstance(user, Response):
            return user
        settings = self.view.settings()
        report = build_report(self.ledger(), limit=500, spool=settings.spool_dir)
        state = request.query_params.get("state")
        rows = [s for s in report["series"] if state in (None, s["state"])]
        return self.page(request, "series", user, series=rows, state=state,
                    states=[s.value for s in SeriesState])

    async def one_series(self, request: Request) -> Response:
        user = await self.who(request)
        if isinstance(user, Response):
            return user
        uid = request.path_params["uid"]
        try:
            info = self.ledger().series_info(uid)
        except NotFound:
            return Response(f"no series {uid}", 404)
        jobs = [j for j in self.ledger().jobs_of_series(uid) if j.result_json]
        lines = _report_lines(AssessmentResult.from_json(jobs[-1].result_json)) if jobs else []
        return self.page(request, "report", user, info=info, lines=lines)

    async def failures(self, request: Request) -> Response:
        user = await self.who(request)
        if isinstance(user, Response):
            return user
        failures = build_report(self.ledger())["failures"]
        return self.page(request, "failures", user, failures=failures)

    async def destinations(self, request: Request) -> Response:
        user = await self.who(request)
        if isinstance(user, Response):
            return user
        return self.page(request, "destinations", user,
                    destinations=self.view.settings().destinations)

    async def senders(self, request: Request) -> Response:
        user = await self.who(request)
        if isinstance(user, Response):
            return user
        rejected = [{"calling_ae": r.calling_ae, "host": r.host, "reason": r.reason,
                     "count": r.count,
                     "last": dt.datetime.fromtimestamp(r.last_seen, dt.UTC)
                     .isoformat(timespec="seconds")}
                    for r in metrics.REJECTIONS.recent()]
        return self.page(request, "senders", user, senders=self.view.settings().senders,
                    rejected=rejected)

    def _command(self, *args: str) -> str:
        config = self.api.store.path if self.api.store is not None else None
        argv = [sys.executable, "-m", "node.cli", *args]
        if config is not None:
            argv += ["--config", str(config)]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                             check=False)
        return (run.stdout + run.stderr).strip() or f"exit status {run.returncode}"

    def _back(self, where: str, message: str) -> Response:
        return RedirectResponse(f"{where}?{urlencode({'message': message})}",
                                HTTP_SEE_OTHER)

    async def retry(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        user = await self.who(request)
        if isinstance(user, Response):
            return user
        uid = request.path_params["uid"]
        out = await run_in_threadpool(self._command, "retry", uid)
        log.info("console_retry", user=user.name, series_uid=uid)
        return self._back("/failures", out)

    async def echo(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        user = await self.who(request)
        if isinstance(user, Response):
            return user
        out = await run_in_threadpool(self._command, "echo", request.path_params["name"])
        return self._back("/destinations", out)

    async def add_sender(self, request: Request) -> Response:
        user = await self.who(request)
        if isinstance(user, Response):
            return user
        if self.api.store is None:
            return self._back("/senders", "no configuration file to change")
        form = await request.form()
        entry = {"ae_title": str(form.get("ae_title", "")).strip(),
                 "host": str(form.get("host", "")).strip()}
        try:
            self.api.store.add("senders", entry, user.name)
        except ConfigError as exc:
            return self._back("/senders", "not added: " + "; ".join(
                f"{k}: {m}" for k, m in exc.problems))
        self.api.apply()
        return self._back("/senders", f"{entry['ae_title']} from {entry['host']} may send now")


    def routes(self) -> list[Route]:
        """The console's routes (mounted at ``/``)."""
        return [
            Route("/login", self.login_page), Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/", self.overview), Route("/series", self.series),
            Route("/series/{uid}", self.one_series),
            Route("/failures", self.failures), Route("/destinations", self.destinations),
            Route("/senders", self.senders),
            Route("/console/retry/{uid}", self.retry, methods=["POST"]),
            Route("/console/echo/{name}", self.echo, methods=["POST"]),
            Route("/console/senders", self.add_sender, methods=["POST"]),
        ]


def create_console(ctx: ConsoleContext) -> list[Route]:
    """The console's routes (mounted at ``/``)."""
    return Console(ctx).routes()
