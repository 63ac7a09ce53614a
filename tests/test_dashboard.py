"""deploy/grafana/qcnode.json: every PromQL expression names only metrics the node
exports (the families node/metrics.py and node/web/collect.py define, with the sample
suffixes prometheus-client gives them), and a real Prometheus scraping a real node
evaluates every expression without error — with data for what that node has done."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from node.config import load_settings
from node.metrics import metrics
from node.store.ingest import STATE_FILE
from node.web.collect import StateCollector
from tests.support.e2e import NodeSite, series_uid_of, storescu, synth_series
from tests.support.net import free_port, wait_for

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "qcnode.json"
PROMETHEUS = Path("/usr/bin/prometheus")
ECHOSCU = "/usr/bin/echoscu"
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created")}
METRIC = re.compile(r"\b(qcnode_[a-z0-9_]+)\b")
#: Grafana's variables, as a test query gives them to Prometheus
VARIABLES = {"$instance": ".*", "$__rate_interval": "1m"}
#: what the node below does not do: deliver (it has no destination)
NOT_DONE = ("qcnode_delivery_",)


def expressions() -> list[str]:
    """Every target expression of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    found = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(found) >= 15
    return found


def families(tmp_path: Path) -> dict[str, str]:
    """Family name → type of the node's event and state metrics, defined in code."""
    from prometheus_client import REGISTRY

    metrics()  # registers the event metrics in this process
    found = {m.name: m.type for m in REGISTRY.collect() if m.name.startswith("qcnode_")}
    settings = load_settings(None, node={"home": tmp_path})
    (tmp_path / "journal").mkdir(parents=True, exist_ok=True)
    (tmp_path / "journal" / STATE_FILE).write_text('{"waiting": 0}')
    state = StateCollector(lambda: settings, lambda: None, lambda _s: {"gpu": 0, "io": 0})
    found.update({m.name: m.type for m in state.collect()})
    return found


def test_every_expression_names_exported_metrics(tmp_path: Path) -> None:
    defined = families(tmp_path)
    exported = {name + suffix for name, kind in defined.items() for suffix in SUFFIXES[kind]}
    used = {name for expr in expressions() for name in METRIC.findall(expr)}
    assert used <= exported, sorted(used - exported)
    # each family of the node appears on the dashboard
    assert {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used} >= \
        set(defined)
    for expr in expressions():
        if "_bucket" in expr:
            assert expr.startswith("histogram_quantile("), expr


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def _query(port: int, expr: str) -> dict[str, Any]:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    status, body = _get(f"http://127.0.0.1:{port}/api/v1/query?"
                        + urllib.parse.urlencode({"query": expr}))
    assert status == 200 and body["status"] == "success", (expr, body)
    return dict(body["data"])


def test_a_real_prometheus_evaluates_every_panel(tmp_path: Path) -> None:
    site = NodeSite(tmp_path / "home", None)
    folder = synth_series(tmp_path / "ct", slices=6, size=64)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    site.start()
    proc = None
    try:
        config.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: qcnode\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{site.web_port}']\n")
        proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}",
             f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        storescu(folder, site.port)
        assert subprocess.run([ECHOSCU, "-aet", "X", "-aec", "WRONG", "127.0.0.1",
                               str(site.port)], capture_output=True, timeout=30,
                              check=False).returncode != 0
        # an API request refused (no account yet): qcnode_http_refused_total
        assert _get(f"http://127.0.0.1:{site.web_port}/api/config/senders")[0] == 401
        site.wait_state(series_uid_of(folder), site_state("delivered"), timeout=120)
        wanted = [e for e in expressions() if not any(n in e for n in NOT_DONE)]

        def answered() -> bool:
            try:
                return all(_query(port, e)["result"] for e in wanted)
            except OSError:
                return False
        try:
            wait_for(answered, timeout=90, interval=1.0)
        except TimeoutError as exc:
            empty = [e for e in wanted if not _safe_result(port, e)]
            raise AssertionError(f"no data for {empty}") from exc
        for expr in expressions():  # the rest: valid PromQL, evaluated (no data yet)
            _query(port, expr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        site.stop()
        shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)


def _safe_result(port: int, expr: str) -> bool:
    try:
        return bool(_query(port, expr)["result"])
    except (OSError, AssertionError):
        return False


def site_state(name: str) -> Any:
    from node.ledger import SeriesState

    return SeriesState(name)
