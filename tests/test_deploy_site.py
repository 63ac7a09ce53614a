"""deploy/: the Kubernetes manifests validate against the Kubernetes API schemas
(kubernetes-validate, strict: unknown fields fail), the compose file's port mapping,
report volume and healthcheck are what the node needs, and the probe commands both use
answer 0 from a ready node and fail against nothing (run here against a real node)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from node.config import load_settings
from tests.support.e2e import NodeSite
from tests.support.net import free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBE = DEPLOY / "kubernetes"
#: The oldest Kubernetes still supported upstream when this was written, and the newest
#: the validator bundles.
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
REPORTS = "/var/lib/qcnode/reports"
VARIABLE = re.compile(r"^\$\{(\w+):-(\d+)\}$")


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) of every Kubernetes object under deploy/kubernetes."""
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def objects(kind: str) -> dict[str, dict[str, Any]]:
    """The objects of ``kind`` by name."""
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def qcnode_pods() -> dict[str, dict[str, Any]]:
    """The pod specs running a qcnode image, by workload name."""
    workloads = {**objects("StatefulSet"), **objects("Deployment")}
    return {name: w["spec"]["template"]["spec"] for name, w in workloads.items()
            if w["spec"]["template"]["spec"]["containers"][0]["image"].startswith("qcnode")}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    assert len(manifests()) >= 12
    for name, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name} {doc['kind']}/{doc['metadata']['name']}: "
                                 f"{exc.message} at {list(exc.path)}") from exc


def test_the_validator_refuses_a_broken_manifest() -> None:
    pod = dict(qcnode_pods()["qcnode-node"])
    broken = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
              "spec": {**pod, "containers": [{**pod["containers"][0], "imagePullPolice": "x"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    listed = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    files = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml",
                                                     "secrets.example.yaml"}
    assert sorted(listed) == sorted(files)


def test_the_site_runs_a_listener_gpu_workers_and_its_own_brokers() -> None:
    pods = qcnode_pods()
    assert set(pods) == {"qcnode-node", "qcnode-worker-io", "qcnode-worker-gpu"}
    assert {"postgres", "rabbitmq"} <= set(objects("StatefulSet"))
    node = objects("StatefulSet")["qcnode-node"]
    assert node["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "home"
    gpu = pods["qcnode-worker-gpu"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["args"][-2:] == ["--queues", "gpu"]
    assert objects("Service")["qcnode-dicom"]["spec"]["ports"][0]["targetPort"] == "dicom"
    # every qcnode pod has the shared reports volume at <home>/reports
    claim = objects("PersistentVolumeClaim")["qcnode-reports"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, pod in pods.items():
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts[REPORTS]]["persistentVolumeClaim"]["claimName"] == \
            "qcnode-reports", name


def test_secrets_referenced_exist_in_the_example() -> None:
    secret = objects("Secret")["qcnode-secrets"]["stringData"]
    refs = [env["valueFrom"]["secretKeyRef"] for _, doc in manifests()
            if doc["kind"] in ("StatefulSet", "Deployment")
            for container in doc["spec"]["template"]["spec"]["containers"]
            for env in container.get("env", []) if "valueFrom" in env]
    assert len(refs) >= 8
    for ref in refs:
        assert ref["name"] == "qcnode-secrets" and ref["key"] in secret


def test_the_configmap_is_a_valid_node_configuration(tmp_path: Path) -> None:
    text = objects("ConfigMap")["qcnode-config"]["data"]["qcnode.toml"]
    (tmp_path / "qcnode.toml").write_text(text)
    settings = load_settings(tmp_path / "qcnode.toml")
    assert settings.node.host == "0.0.0.0" and settings.audit.target == "file"


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def test_compose_port_mapping_follows_the_node_port() -> None:
    spec = compose()
    env = spec["x-qcnode-env"]
    node_port = VARIABLE.match(env["QCNODE_NODE__PORT"])
    mapping = re.fullmatch(r"(\$\{.+?\}):(\$\{.+?\})", spec["services"]["node"]["ports"][0])
    assert node_port is not None and mapping is not None
    for side in mapping.groups():
        match = VARIABLE.match(side)
        assert match is not None and match.groups() == node_port.groups(), side
    for name, service in spec["services"].items():
        if str(service.get("image", "")).startswith("qcnode"):
            assert service["environment"]["QCNODE_NODE__PORT"] == env["QCNODE_NODE__PORT"]
            assert f"reports:{REPORTS}" in service["volumes"], name
    assert "reports" in spec["volumes"]


def probe_commands() -> dict[str, list[str]]:
    """The readiness commands of compose's healthcheck and the listener's pod."""
    container = qcnode_pods()["qcnode-node"]["containers"][0]
    return {"compose": compose()["services"]["node"]["healthcheck"]["test"][1:],
            "readiness": container["readinessProbe"]["exec"]["command"],
            "liveness": container["livenessProbe"]["exec"]["command"]}


def test_workers_wait_for_a_healthy_node() -> None:
    for name in ("worker-io", "worker-gpu"):
        assert compose()["services"][name]["depends_on"]["node"]["condition"] == \
            "service_healthy"


def _run(command: list[str], port: int) -> int:
    assert command[0] == "python" and "8480" in command[-1]
    argv = [sys.executable, *command[1:-1], command[-1].replace("8480", str(port))]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode


def test_the_probes_pass_on_a_ready_node_and_fail_without_one(tmp_path: Path) -> None:
    commands = probe_commands()
    assert "/readyz" in commands["compose"][-1] and "/readyz" in commands["readiness"][-1]
    assert "/healthz" in commands["liveness"][-1]
    nothing = free_port()
    assert all(_run(c, nothing) != 0 for c in commands.values())
    site = NodeSite(tmp_path / "home", None)
    site.start()
    try:
        assert {name: _run(c, site.web_port) for name, c in commands.items()} == \
            dict.fromkeys(commands, 0)
    finally:
        site.stop()
