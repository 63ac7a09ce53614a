"""The configuration API on a real ``qcnode serve``: accounts and roles, a sender added
through the API admitted at the next association without a restart, every change
validated like ``config check``, written to the file with its comments and audited."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.e2e import NodeSite

ECHOSCU = "/usr/bin/echoscu"
ADMIN, VIEWER = ("admin", "correct horse battery"), ("viewer", "staple staple staple")


def _call(site: NodeSite, method: str, path: str, body: Any = None,
          user: tuple[str, str] | None = ADMIN, headers: dict[str, str] | None = None
          ) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{site.web_port}{path}", data=data,
                                     method=method, headers=headers or {})
    request.add_header("Content-Type", "application/json")
    if user is not None:
        token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


def _qcnode(site: NodeSite, *args: str, password: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"QCNODE_PASSWORD": password} if password else {})}
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config",
                           str(site.config)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def _echo(site: NodeSite, ae: str) -> bool:
    run = subprocess.run([ECHOSCU, "-aet", ae, "-aec", "QCNODE", "127.0.0.1", str(site.port)],
                         capture_output=True, timeout=30, check=False)
    return run.returncode == 0


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSite]:
    node = NodeSite(tmp_path_factory.mktemp("api") / "home", None)
    node.config.write_text(node.config.read_text() + (
        "\n# the CT scanner in room 2 — keep this comment\n"
        '[[senders]]\nae_title = "SCANNER"\nhost = "127.0.0.1"\n'))
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_without_an_account_the_api_says_how_to_make_one(site: NodeSite) -> None:
    status, body = _call(site, "GET", "/api/config/senders")
    assert status == 401 and "qcnode user add" in body["detail"]
    assert _qcnode(site, "user", "add", ADMIN[0], "--role", "admin",
                   password=ADMIN[1]).returncode == 0
    assert _qcnode(site, "user", "add", VIEWER[0], "--role", "read-only",
                   password=VIEWER[1]).returncode == 0
    assert _call(site, "GET", "/api/config/senders", user=(ADMIN[0], "wrong"))[0] == 401
    users = json.loads((site.home / "users.json").read_text())
    assert users["admin"]["hash"].startswith("scrypt$") and ADMIN[1] not in json.dumps(users)


def test_a_sender_added_through_the_api_is_admitted_without_a_restart(site: NodeSite) -> None:
    assert not _echo(site, "NEWCT")
    status, body = _call(site, "POST", "/api/config/senders",
                         {"ae_title": "NEWCT", "host": "127.0.0.1"})
    assert status == 201 and body == {"applied": True, "restart_needed": []}
    assert _echo(site, "NEWCT")
    status, senders = _call(site, "GET", "/api/config/senders", user=VIEWER)
    assert status == 200 and {"ae_title": "NEWCT", "host": "127.0.0.1"} in senders
    text = site.config.read_text()
    assert "keep this comment" in text and 'ae_title = "NEWCT"' in text
    status, history = _call(site, "GET", "/api/audit/config")
    assert history[0]["who"] == "admin" and history[0]["action"] == "add"
    assert history[0]["before"] is None and history[0]["after"]["ae_title"] == "NEWCT"
    # and removed again: refused at the next association
    status, _ = _call(site, "DELETE", f"/api/config/senders/{len(senders) - 1}")
    assert status == 200 and not _echo(site, "NEWCT")


def test_changes_are_validated_like_config_check(site: NodeSite) -> None:
    before = site.config.read_text()
    status, body = _call(site, "POST", "/api/config/destinations",
                         {"name": "pacs2", "ae_title": "THIS AE TITLE IS TOO LONG", "port": 0})
    assert status == 422
    keys = {p["key"] for p in body["problems"]}
    assert {"destinations[0].ae_title", "destinations[0].host",
            "destinations[0].port"} <= keys, body
    assert site.config.read_text() == before  # nothing written


def test_roles_and_cross_site_requests(site: NodeSite) -> None:
    entry = {"ae_title": "MR1", "host": "127.0.0.1"}
    status, body = _call(site, "POST", "/api/config/senders", entry, user=VIEWER)
    assert status == 403 and "admin role" in body["detail"]
    status, _ = _call(site, "POST", "/api/config/senders", entry,
                      headers={"Origin": "http://intranet.example", "Sec-Fetch-Site": "cross-site"})
    assert status == 403
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{site.web_port}/metrics").read().decode()
    assert 'qcnode_http_refused_total{reason="role"} 1.0' in metrics
    assert 'qcnode_http_refused_total{reason="cross_site"} 1.0' in metrics


def test_the_ae_title_changes_at_the_next_start(site: NodeSite) -> None:
    status, body = _call(site, "PUT", "/api/config/node/ae_title", {"ae_title": "QCNODE2"})
    assert status == 200 and body["restart_needed"] == ["node.ae_title"]
    assert _echo(site, "SCANNER")  # still answering as QCNODE until a restart
    assert _call(site, "GET", "/api/config/node/ae_title")[1] == {"ae_title": "QCNODE2"}
    _call(site, "PUT", "/api/config/node/ae_title", {"ae_title": "QCNODE"})


def test_the_shell_has_the_same_verbs_and_the_schema_is_published(site: NodeSite) -> None:
    run = _qcnode(site, "config", "add", "rules", "name=mr-store",
                  'modalities=["MR"]', "action=store")
    assert run.returncode == 0, run.stderr
    listed = json.loads(_qcnode(site, "config", "list", "rules").stdout)
    assert {"name": "mr-store", "modalities": ["MR"], "action": "store"} in listed
    bad = _qcnode(site, "config", "add", "rules", "name=x", "action=explode")
    assert bad.returncode == 1 and "rules[" in bad.stderr and "action" in bad.stderr
    history = _qcnode(site, "config", "history").stdout.splitlines()
    assert json.loads(history[0])["who"].endswith("@shell")
    status, schema = _call(site, "GET", "/api/openapi.json", user=None)
    assert status == 200 and "/config/{section}" in schema["paths"]
