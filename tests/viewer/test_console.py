"""The admin console in a real browser (Debian's Chromium driven by playwright-core, as
the OHIF test does): an admin sees a rejected scanner, admits it from the console, and
its next association is accepted; series, their report, failures and destinations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.ledger import SeriesState
from node.web.auth import SESSION_COOKIE, Sessions, User
from tests.support.e2e import NodeSite, series_uid_of, storescu, synth_series
from tests.support.ohif import chromium_path

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("drive.mjs")
ARTIFACTS = REPO / "test-artifacts" / "console"
SCREENSHOT = REPO / "docs" / "img" / "console-senders.png"
ECHOSCU = "/usr/bin/echoscu"
ADMIN = {"username": "admin", "password": "console admin password"}


def _echo(site: NodeSite, ae: str) -> bool:
    run = subprocess.run([ECHOSCU, "-aet", ae, "-aec", "QCNODE", "127.0.0.1", str(site.port)],
                         capture_output=True, timeout=30, check=False)
    return run.returncode == 0


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSite]:
    node = NodeSite(tmp_path_factory.mktemp("console") / "home", None)
    node.config.write_text(node.config.read_text()
                           + '\n[[senders]]\nae_title = "SCANNER"\nhost = "127.0.0.1"\n')
    node.start()
    env = {**os.environ, "QCNODE_PASSWORD": ADMIN["password"]}
    subprocess.run([sys.executable, "-m", "node.cli", "user", "add", "admin", "--role",
                    "admin", "--config", str(node.config)], env=env, check=True, timeout=60)
    try:
        yield node
    finally:
        node.stop()


def _drive(site: NodeSite, name: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    plan = {
        "timeoutMs": 30000, "viewport": [1280, 800],
        "userDataDir": str(site.home / f"chromium-{name}"),
        "executablePath": str(chromium_path()),
        "failureScreenshot": str(ARTIFACTS / f"{name}-failure.png"), "steps": steps,
    }
    proc = subprocess.run(["node", str(DRIVER)], input=json.dumps(plan).encode(),
                          capture_output=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    assert report["error"] is None, report["error"]
    assert report["pageErrors"] == [], report["pageErrors"]
    return report


def _sign_in() -> list[dict[str, Any]]:
    return [{"waitSelector": "#login"},
            {"fill": "#login input[name=username]", "value": ADMIN["username"]},
            {"fill": "#login input[name=password]", "value": ADMIN["password"]},
            {"click": "#login button"}]


def _get(site: NodeSite, path: str, cookie: str | None = None) -> tuple[int, str, str]:
    """(status, final path, body) of a browser-like GET (redirects followed)."""
    request = urllib.request.Request(f"http://127.0.0.1:{site.web_port}{path}",
                                     headers={"Accept": "text/html"})
    if cookie is not None:
        request.add_header("Cookie", f"{SESSION_COOKIE}={cookie}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status), urllib.parse.urlparse(response.url).path, \
            response.read().decode()


def test_sessions_expire_and_forms_need_their_token(site: NodeSite) -> None:
    """A session cookie signed by the node lets a browser in until it expires; an
    expired or altered one sends it back to the sign-in page; a form posted without the
    session's CSRF token is refused."""
    sessions = Sessions(site.home, minutes=60)
    admin = User("admin", "admin")
    now = time.time()
    good = sessions.issue(admin, now)
    assert _get(site, "/senders", good)[1] == "/senders"
    assert _get(site, "/senders", sessions.issue(admin, now - 3601))[1] == "/login"
    assert _get(site, "/senders", good.replace("|admin|", "|root|"))[1] == "/login"
    assert _get(site, "/senders")[1] == "/login"
    form = urllib.parse.urlencode({"ae_title": "X", "host": "127.0.0.1"}).encode()
    post = urllib.request.Request(f"http://127.0.0.1:{site.web_port}/console/senders",
                                  data=form, method="POST",
                                  headers={"Cookie": f"{SESSION_COOKIE}={good}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=30)
    assert refused.value.code == 403


def test_an_admin_admits_a_rejected_scanner_from_the_console(site: NodeSite) -> None:
    assert not _echo(site, "CT_ROOM3")  # a new scanner, not yet allowed
    base = f"http://127.0.0.1:{site.web_port}"
    report = _drive(site, "senders", [
        {"goto": f"{base}/senders"}, *_sign_in(),  # the console asks first
        {"waitText": "Rejected callers"},
        {"text": "rejected", "selector": "#rejected"},
        {"fill": "#add-sender input[name=ae_title]", "value": "CT_ROOM3"},
        {"fill": "#add-sender input[name=host]", "value": "127.0.0.1"},
        {"click": "#add-sender button"}, {"waitText": "may send now"},
        {"text": "senders", "selector": "#senders"},
        {"screenshot": str(ARTIFACTS / "senders.png")},
    ])
    rejected = report["texts"]["rejected"]
    assert "CT_ROOM3" in rejected and "calling_ae_or_host" in rejected
    assert "CT_ROOM3" in report["texts"]["senders"]
    assert _echo(site, "CT_ROOM3")  # admitted at its next association, no restart
    if os.environ.get("QCNODE_UPDATE_SCREENSHOTS"):
        SCREENSHOT.write_bytes((ARTIFACTS / "senders.png").read_bytes())


def test_series_and_the_report_a_radiologist_reads(site: NodeSite, tmp_path: Path) -> None:
    folder = synth_series(tmp_path / "ct", slices=8, size=128)
    storescu(folder, site.port)
    uid = series_uid_of(folder)
    site.wait_state(uid, SeriesState.DELIVERED, timeout=120)
    base = f"http://127.0.0.1:{site.web_port}"
    report = _drive(site, "series", [
        {"goto": f"{base}/"}, *_sign_in(),
        {"waitText": "journal backlog"}, {"bodyText": "overview"},
        {"goto": f"{base}/series"}, {"waitSelector": "#series"},
        {"text": "series", "selector": "#series"},
        {"click": f"a[href='/series/{uid}']"}, {"waitSelector": "#report"},
        {"text": "report", "selector": "#report"},
        {"goto": f"{base}/failures"}, {"bodyText": "failures"},
        {"goto": f"{base}/destinations"}, {"bodyText": "destinations"},
    ])
    texts = report["texts"]
    assert "delivered" in texts["overview"] and "queue gpu" in texts["overview"]
    assert uid in texts["series"] and "delivered" in texts["series"]
    assert "Series quality" in texts["report"] and "Noise" in texts["report"]
    assert "None." in texts["failures"]
