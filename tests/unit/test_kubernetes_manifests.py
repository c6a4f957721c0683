"""deploy/kubernetes: the manifests render with ``kubectl kustomize`` (when kubectl is installed)
and have the shape the deployment needs; the image build pins every dependency and runs as a
non-root user. No cluster and no image build run here (docs/deploy.md says so)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
RUNTIME = {"tdx": "kata-qemu-tdx", "snp": "kata-qemu-snp"}


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the overlays are not rendered here")
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}


@pytest.mark.parametrize("overlay", sorted(RUNTIME))
def test_overlay_renders_confidential_non_root_workloads(overlay: str) -> None:
    docs = render(overlay)
    deployments = workloads(docs)
    assert set(deployments) == {"veil-broker", "veil-replica"}
    for d in deployments.values():
        pod = d["spec"]["template"]["spec"]
        assert d["metadata"]["namespace"] == "veil"
        assert pod["runtimeClassName"] == RUNTIME[overlay]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["image"] == "registry.example/veil:set-me"


def test_replicas_join_the_broker_and_read_the_database_url_from_the_secret() -> None:
    docs = render("tdx")
    replica = by_kind(docs, "Deployment")["veil-replica"]
    assert replica["spec"]["replicas"] == 3
    (container,) = replica["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    broker = by_kind(docs, "Service")["veil-broker"]
    assert (
        args[args.index("--join") + 1] == f"http://veil-broker:{broker['spec']['ports'][0]['port']}"
    )
    assert "--database-url" not in args  # never a password on the command line
    env = {e["name"]: e for e in container["env"]}
    secret_ref = env["VEIL_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    (secret,) = by_kind(docs, "Secret").values()
    # kustomize renamed the generated Secret (hash suffix) and the reference with it.
    assert secret_ref == {"name": secret["metadata"]["name"], "key": "url"}
    assert env["VEIL_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("overlay", sorted(RUNTIME))
def test_brokers_keep_nothing_at_rest_and_take_the_secrets_from_a_live_peer(overlay: str) -> None:
    # TDX and SEV-SNP have no sealing key: a broker without --peer or --new-cluster refuses to
    # start, and one that made new secrets on every restart would lose the store key.
    docs = render(overlay)
    broker = by_kind(docs, "StatefulSet")["veil-broker"]
    assert broker["spec"]["replicas"] >= 2
    assert broker["spec"]["podManagementPolicy"] == "OrderedReady"
    pod = broker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    service = by_kind(docs, "Service")["veil-broker"]
    port = service["spec"]["ports"][0]["port"]
    assert args[args.index("--peer") + 1] == f"http://veil-broker:{port}"
    assert "--new-cluster" in args
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/offer"
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    assert "veil-broker-data" not in by_kind(docs, "PersistentVolumeClaim")
    budget = by_kind(docs, "PodDisruptionBudget")["veil-broker"]
    assert budget["spec"]["minAvailable"] == 1


def test_service_is_tcp_passthrough_to_the_replicas() -> None:
    docs = render("snp")
    service = by_kind(docs, "Service")["veil"]
    replica = by_kind(docs, "Deployment")["veil-replica"]
    labels = replica["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: (p["port"], p["protocol"]) for p in service["spec"]["ports"]}
    assert ports == {
        "unattested": (9923, "TCP"),
        "attested": (9924, "TCP"),
        "management": (9925, "TCP"),
    }
    container_ports = {
        p["name"] for p in replica["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_base_files_are_plain_yaml() -> None:
    # Without kubectl, at least every file parses and names its kind.
    for path in sorted(KUBE.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict)
            assert "kind" in doc or path.name == "kustomization.yaml", path


def test_image_pins_every_dependency_and_runs_as_non_root() -> None:
    containerfile = (KUBE / "Containerfile").read_text()
    users = re.findall(r"^USER (\S+)$", containerfile, re.M)
    assert users == ["10001:10001"]
    assert "PIP_CONSTRAINT=/src/deploy/kubernetes/constraints.txt" in containerfile
    assert "@sha256:" in containerfile  # an unpinned base image is refused by the build
    pins = {}
    for line in (KUBE / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), line
            pins[name.lower().replace("_", "-")] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["cluster"]]
    for requirement in wanted:
        name = re.split(r"[<>=!\[ ;~]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name}: not pinned in constraints.txt"
