"""The REST API (``/api``, FastAPI; schema at ``/api/openapi.json``).

Configuration of the running node — its AE title, senders, destinations and rules —
listed, added, changed and removed through :class:`~node.config_store.ConfigStore`:
each change is validated as ``qcnode config check`` validates, written to the node's
file, recorded in the audit trail and applied like a SIGHUP reload (the AE title
changes at the next start: the answer says so). Every call needs an account
(HTTP Basic, :mod:`node.web.auth`); changes need the ``admin`` role.
"""


from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from node.config import ConfigError
from node.config_store import ConfigStore, NotFound, problems_of
from node.logs import get_logger
from node.web.auth import Accounts, User, cross_site

log = get_logger(__name__)
HTTP_CREATED = 201
HTTP_UNAUTHORIZED = 401
HTTP_FORBIDDEN = 403
HTTP_NOT_FOUND = 404
HTTP_UNPROCESSABLE = 422
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class ApiContext:
    """What the API works on: the node's file, its accounts, and how to apply a change."""

    store: ConfigStore | None
    accounts: Accounts
    #: Apply the file now (the SIGHUP reload); returns the keys that wait for a restart.
    apply: Callable[[], tuple[str, ...]]
    refused: Callable[[str], None]


def create_api(ctx: ApiContext) -> FastAPI:
    """The ``/api`` application."""
    api = FastAPI(title="qcnode", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")

    def caller(request: Request) -> User:
        user = ctx.accounts.check(request.headers.get("authorization"))
        if user is None:
            reason = "no_account" if not ctx.accounts.any() else "bad_credentials"
            ctx.refused(reason)
            detail = ("no account exists: create one with `qcnode user add NAME --role admin`"
                      if reason == "no_account" else "credentials required")
            raise HTTPException(HTTP_UNAUTHORIZED, detail,
                                headers={"WWW-Authenticate": 'Basic realm="qcnode"'})
        if request.method not in SAFE_METHODS:
            if cross_site({k.lower(): v for k, v in request.headers.items()},
                          request.headers.get("host")):
                ctx.refused("cross_site")
                raise HTTPException(HTTP_FORBIDDEN, "cross-site request refused")
            if user.role != "admin":
                ctx.refused("role")
                raise HTTPException(HTTP_FORBIDDEN, f"{user.name} is {user.role}: "
                                    "changes need the admin role")
        return user

    Caller = Annotated[User, Depends(caller)]

    def store() -> ConfigStore:
        if ctx.store is None:
            raise HTTPException(HTTP_NOT_FOUND, "the node runs on built-in defaults: there "
                                "is no configuration file to change (start it with --config)")
        return ctx.store

    def changed(action: Callable[[ConfigStore], Any], user: User,
                status: int = 200) -> JSONResponse:
        try:
            action(store())
        except NotFound as exc:
            raise HTTPException(HTTP_NOT_FOUND, str(exc)) from None
        except ConfigError as exc:
            log.info("config_change_refused", user=user.name, problems=len(exc.problems))
            return JSONResponse({"detail": "invalid configuration",
                                 "problems": problems_of(exc)}, HTTP_UNPROCESSABLE)
        restart = ctx.apply()
        log.info("config_changed", user=user.name)
        return JSONResponse({"applied": True, "restart_needed": list(restart)}, status)

    @api.get("/config/node/ae_title")
    def get_ae_title(_user: Caller) -> dict[str, Any]:
        """The node's AE title as configured."""
        return {"ae_title": store().value("node", "ae_title")}

    @api.put("/config/node/ae_title")
    def set_ae_title(body: dict[str, str], user: Caller) -> JSONResponse:
        """Change the node's AE title (taken at the next start)."""
        return changed(lambda s: s.set_value("node", "ae_title", body.get("ae_title"),
                                             user.name), user)

    @api.get("/config/{section}")
    def list_entries(section: str, _user: Caller) -> list[dict[str, Any]]:
        """The entries of ``[[senders]]``, ``[[destinations]]`` or ``[[rules]]``."""
        try:
            return store().entries(section)
        except NotFound as exc:
            raise HTTPException(HTTP_NOT_FOUND, str(exc)) from None

    @api.post("/config/{section}", status_code=HTTP_CREATED)
    def add_entry(section: str, entry: dict[str, Any], user: Caller) -> JSONResponse:
        """Add an entry; 422 with every problem when the result would be invalid."""
        return changed(lambda s: s.add(section, entry, user.name), user, HTTP_CREATED)

    @api.put("/config/{section}/{ref}")
    def change_entry(section: str, ref: str, entry: dict[str, Any],
                     user: Caller) -> JSONResponse:
        """Replace the entry ``ref`` (a destination's or rule's name; a sender's index)."""
        return changed(lambda s: s.replace(section, ref, entry, user.name), user)

    @api.delete("/config/{section}/{ref}")
    def remove_entry(section: str, ref: str, user: Caller) -> JSONResponse:
        """Remove the entry ``ref``."""
        return changed(lambda s: s.remove(section, ref, user.name), user)

    @api.get("/audit/config")
    def audit(_user: Caller, limit: int = 100) -> list[dict[str, Any]]:
        """The configuration changes, newest first: who, when, what, before, after."""
        return store().history(limit)

    return api
