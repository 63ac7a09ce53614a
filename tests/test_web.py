"""The node's HTTP side on a real ``qcnode serve``: health, readiness, Prometheus metrics
— scraped by a real Prometheus server (Debian's ``prometheus``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import ConfigError, load_settings
from tests.support.e2e import NodeSite, series_uid_of, storescu, synth_series
from tests.support.net import free_port, wait_for
from tests.support.pki import issue, make_ca

PROMETHEUS = Path("/usr/bin/prometheus")
ECHOSCU = "/usr/bin/echoscu"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (None when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        metric, _, rest = key.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if metric == name and got == want:
            return float(value)
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSite]:
    home = tmp_path_factory.mktemp("web") / "home"
    node = NodeSite(home, None)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_health_and_readiness(site: NodeSite) -> None:
    base = f"http://127.0.0.1:{site.web_port}"
    assert _get(f"{base}/healthz") == (200, '{"status":"ok"}')
    status, body = _get(f"{base}/readyz")
    assert status == 200, body
    assert json.loads(body) == {"status": "ready", "checks": {
        "listener": "ok", "ledger": "ok", "broker": "ok", "disk": "ok"}}


def test_metrics_count_images_and_rejected_callers(site: NodeSite, tmp_path: Path) -> None:
    folder = synth_series(tmp_path / "ct", slices=6, size=64)
    storescu(folder, site.port)
    echo = subprocess.run([ECHOSCU, "-aet", "STRANGER", "-aec", "WRONG", "127.0.0.1",
                           str(site.port)], capture_output=True, timeout=30, check=False)
    assert echo.returncode != 0  # rejected: called AE not ours
    metrics_url = f"http://127.0.0.1:{site.web_port}/metrics"

    def counted() -> bool:
        text = _get(metrics_url)[1]
        return _sample(text, "qcnode_images_total", status="success") == 6.0
    wait_for(counted, timeout=30)
    text = _get(metrics_url)[1]
    assert _sample(text, "qcnode_associations_total", result="rejected",
                   reason="called_ae") == 1.0
    assert (_sample(text, "qcnode_associations_total", result="accepted", reason="") or 0) >= 1
    assert _sample(text, "qcnode_disk_free_bytes") is not None
    assert _sample(text, "qcnode_queue_depth", queue="gpu") is not None
    site.wait_state(series_uid_of(folder), site_state("delivered"), timeout=120)
    text = _get(metrics_url)[1]
    assert _sample(text, "qcnode_series", state="delivered") == 1.0
    # the embedded gpu worker's histogram, summed by the serve process
    assert _sample(text, "qcnode_assessment_seconds_count", engine="physics") == 1.0


def site_state(name: str) -> Any:
    from node.ledger import SeriesState

    return SeriesState(name)


def test_a_real_prometheus_scrapes_the_node(site: NodeSite, tmp_path: Path) -> None:
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} missing: run `make system-deps`")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: qcnode\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{site.web_port}']\n")
    proc = subprocess.Popen(
        [str(PROMETHEUS), f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = urllib.parse.quote('qcnode_disk_free_bytes{job="qcnode"}')

        def scraped() -> bool:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/api/v1/query?query={query}")
            except OSError:
                return False
            return status == 200 and bool(json.loads(body)["data"]["result"])
        wait_for(scraped, timeout=60)
        _, body = _get(f"http://127.0.0.1:{port}/api/v1/targets")
        (target,) = json.loads(body)["data"]["activeTargets"]
        assert target["health"] == "up", target
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)


def test_readiness_fails_with_the_reason_when_the_disk_is_past_its_watermark(
    tmp_path: Path,
) -> None:
    node = NodeSite(tmp_path / "home", None)
    text = node.config.read_text().replace("[spool]",
                                           "[spool]\nmin_free_bytes = 1000000000000000000")
    node.config.write_text(text)
    node.start()
    try:
        status, body = _get(f"http://127.0.0.1:{node.web_port}/readyz")
        assert status == 503
        checks = json.loads(body)["checks"]
        assert "below its watermark" in checks["disk"] and checks["ledger"] == "ok"
    finally:
        node.stop()


def test_off_loopback_the_web_side_needs_https_and_an_admin(tmp_path: Path) -> None:
    """Another address than loopback: the configuration check asks for HTTPS, and the
    node leaves the web side off (serving DICOM) until an admin account exists."""
    from node.serve import web_refusal
    from node.web.auth import Accounts

    config = tmp_path / "q.toml"
    config.write_text('[web]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert "needs HTTPS" in str(info.value.problems)
    ca = make_ca(tmp_path / "pki")
    cert = issue(ca, tmp_path / "pki", "web", dns=("localhost",))
    config.write_text(f'[node]\nhome = "{tmp_path / "home"}"\n[web]\nhost = "0.0.0.0"\n'
                      f'tls_cert_file = "{cert.cert}"\ntls_key_file = "{cert.key}"\n')
    settings = load_settings(config)
    assert "no admin account" in (web_refusal(settings) or "")
    Accounts(settings.node.home).add("viewer", "a long enough password", "read-only")
    assert web_refusal(settings) is not None  # a read-only account is not enough
    Accounts(settings.node.home).add("admin", "a long enough password", "admin")
    assert web_refusal(settings) is None


def test_the_web_side_over_https(tmp_path: Path) -> None:
    """With a certificate the console, API, health and metrics are served over TLS only
    (here on loopback: tests bind 127.0.0.1)."""
    import ssl

    ca = make_ca(tmp_path / "pki")
    cert = issue(ca, tmp_path / "pki", "web", dns=("localhost",), ip=("127.0.0.1",))
    node = NodeSite(tmp_path / "home", None)
    node.config.write_text(node.config.read_text().replace(
        "[web]\n", f'[web]\ntls_cert_file = "{cert.cert}"\ntls_key_file = "{cert.key}"\n'))
    node.start()
    try:
        context = ssl.create_default_context(cafile=str(ca.cert))
        url = f"https://127.0.0.1:{node.web_port}/healthz"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            assert response.status == 200
        with pytest.raises(OSError):  # plain HTTP is not served (the connection is cut)
            urllib.request.urlopen(f"http://127.0.0.1:{node.web_port}/healthz", timeout=10)
    finally:
        node.stop()
