"""chatfleet on a real control plane: Helm installs the chart, the operator runs as the
chart's ServiceAccount, KubeRay turns our RayService into a RayCluster.

The operator runs out of cluster, as a process of this test, with exactly the
environment and arguments of the chart's Deployment and a token of the chart's
ServiceAccount: every API call it makes is authorised by the chart's RBAC, and
admitted by a real API server (``OwnerReferencesPermissionEnforcement`` included).
The chart's own operator Pod never runs: there is no scheduler or kubelet.

The tests of this module share one installation and run in order: install, admit,
reconcile, edit, restart, lose a permission, delete.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cluster_helpers import ROOT, Cluster, KubectlError, eventually
from tests.fakes.ports import free_port

from chatfleet.operator._names import OWNER_LABEL, jwt_secret_name, service_name

sys.path.insert(0, str(ROOT / "tests" / "operator"))
from operator_helpers import BAD_SPECS, load_sample

RELEASE = "chatfleet"
SYSTEM_NS = "chatfleet-system"
APPS_NS = "apps"
CPU_SAMPLE = "chatfleet.dev_v1alpha1_chatdeployment.yaml"
GPU_SAMPLE = "chatfleet.dev_v1alpha1_chatdeployment_gpu.yaml"

# jsonschema's words (tests/operator) -> the API server's words for the same violation.
SERVER_WORDS = {
    "is not one of": "Unsupported value",
    "less than the minimum": "should be greater than or equal to",
    "does not match": "should match",
    "non-empty": "should have at least 1 items",
    "'key' is a required property": "Required value",
}


def chatd(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "chatfleet.dev/v1alpha1",
        "kind": "ChatDeployment",
        "metadata": {"name": name, "namespace": APPS_NS},
        "spec": spec,
    }


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond  # type: ignore[no-any-return]
    return None


# --- the installation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chart(cluster: Cluster) -> Iterator[dict[str, Any]]:
    """``helm install`` of charts/chatfleet; yields the operator Deployment it rendered."""
    cluster.helm(
        "install", RELEASE, str(ROOT / "charts" / "chatfleet"),
        "--namespace", SYSTEM_NS, "--create-namespace",
    )  # fmt: skip
    manifest = cluster.helm("get", "manifest", RELEASE, "-n", SYSTEM_NS).stdout
    deployment = next(
        doc for doc in yaml.safe_load_all(manifest) if doc and doc.get("kind") == "Deployment"
    )
    cluster.kubectl("create", "namespace", APPS_NS)
    yield deployment
    cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS, check=False)


class OperatorProcess:
    """`chatfleet-operator` as the chart's Deployment would run it, as its ServiceAccount."""

    def __init__(self, cluster: Cluster, deployment: dict[str, Any], workdir: Path) -> None:
        self.cluster = cluster
        pod = deployment["spec"]["template"]["spec"]
        self.container = pod["containers"][0]
        self.service_account = pod["serviceAccountName"]
        self.workdir = workdir
        self.log = workdir / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.health_port = free_port()

    def _kubeconfig(self) -> Path:
        token = self.cluster.kubectl(
            "create", "token", self.service_account, "-n", SYSTEM_NS, "--duration=2h"
        ).stdout.strip()
        admin = yaml.safe_load(self.cluster.kubeconfig.read_text())
        context = admin["contexts"][0]["context"]
        server = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
        path = self.workdir / "operator.kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [server],
                    "users": [{"name": "operator", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "operator",
                            "context": {"cluster": server["name"], "user": "operator"},
                        }
                    ],
                    "current-context": "operator",
                }
            )
        )
        return path

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATFLEET_OPERATOR_")}
        for var in self.container.get("env") or []:
            if "value" in var:
                env[var["name"]] = var["value"]
        env["POD_NAME"] = "chatfleet-operator-cluster-test"
        # Ports of this machine, not of a pod: free ones, on loopback.
        env["CHATFLEET_OPERATOR_METRICS_HOST"] = "127.0.0.1"
        env["CHATFLEET_OPERATOR_METRICS_PORT"] = str(free_port())
        env["KUBECONFIG"] = str(self._kubeconfig())
        return env

    def _args(self) -> list[str]:
        args = []
        for arg in self.container.get("args") or []:
            if arg.startswith("--liveness="):
                arg = f"--liveness=http://127.0.0.1:{self.health_port}/healthz"
            args.append(arg)
        return args

    def start(self) -> None:
        assert self.proc is None
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatfleet.operator.cli", *self._args()],
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"the operator exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz").is_success
            except httpx.TransportError:
                return False

        eventually(healthy, "the operator's liveness endpoint", timeout=60)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc = self.proc
        self.proc = None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, chart: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster, chart, tmp_path_factory.mktemp("operator"))
    proc.start()
    yield proc
    proc.stop()
    print(f"--- operator log (tail) ---\n{proc.tail()}")


# --- install and admission -----------------------------------------------------------


def test_the_chart_installs_and_the_api_server_accepts_the_crd(
    cluster: Cluster, chart: dict[str, Any]
) -> None:
    crd = cluster.get("crd", "chatdeployments.chatfleet.dev")
    assert crd is not None
    established = next(
        c for c in crd["status"]["conditions"] if c["type"] == "Established"
    )  # CEL rules past the server's cost estimate, structural schema accepted
    assert established["status"] == "True", crd["status"]
    assert cluster.get("serviceaccount", chart["spec"]["template"]["spec"]["serviceAccountName"],
                       SYSTEM_NS) is not None  # fmt: skip
    printed = cluster.kubectl("get", "chatd", "-A").stderr
    assert "No resources found" in printed


@pytest.mark.parametrize("sample", [CPU_SAMPLE, GPU_SAMPLE])
def test_the_samples_are_admitted(cluster: Cluster, chart: dict[str, Any], sample: str) -> None:
    obj = load_sample(sample)
    obj["metadata"]["namespace"] = APPS_NS
    out = cluster.apply(obj, "--dry-run=server")
    assert "created (server dry run)" in out


@pytest.mark.parametrize(("spec", "expected"), BAD_SPECS)
def test_bad_specs_are_rejected_by_the_api_server(
    cluster: Cluster, chart: dict[str, Any], spec: dict[str, Any], expected: str
) -> None:
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-",
        stdin=yaml.safe_dump(chatd("bad", spec)), check=False,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert SERVER_WORDS.get(expected, expected) in result.stderr, result.stderr


# --- reconcile against KubeRay -----------------------------------------------------------


def _cpu_sample() -> dict[str, Any]:
    obj = load_sample(CPU_SAMPLE)
    obj["metadata"]["namespace"] = APPS_NS
    return obj


def _rayclusters(cluster: Cluster) -> list[dict[str, Any]]:
    return cluster.items("raycluster", APPS_NS)


def test_kuberay_builds_the_cluster_from_our_rayservice(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    sample = _cpu_sample()
    name = sample["metadata"]["name"]
    cluster.apply(sample)

    rs = eventually(lambda: cluster.get("rayservice", name, APPS_NS), "the RayService")
    owner = rs["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("ChatDeployment", name, True)
    assert rs["metadata"]["labels"][OWNER_LABEL] == name

    secret = eventually(lambda: cluster.get("secret", jwt_secret_name(name), APPS_NS), "JWT key")
    assert len(base64.b64decode(secret["data"]["signing-key"])) >= 48
    assert cluster.get("service", service_name(name), APPS_NS) is not None

    # KubeRay's work: a RayCluster, its head Pod (Pending: no kubelet) and head Service.
    raycluster = eventually(lambda: _rayclusters(cluster), "KubeRay's RayCluster", timeout=90)[0]
    rc_name = raycluster["metadata"]["name"]
    assert raycluster["metadata"]["ownerReferences"][0]["kind"] == "RayService"
    head = eventually(
        lambda: cluster.items("pod", APPS_NS, f"ray.io/cluster={rc_name},ray.io/node-type=head"),
        "the head Pod",
        timeout=90,
    )[0]
    assert head["status"].get("phase") == "Pending"
    env = {e["name"]: e.get("value") for e in head["spec"]["containers"][0].get("env") or []}
    assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    eventually(
        lambda: cluster.items("service", APPS_NS, f"ray.io/cluster={rc_name}"),
        "the head Service",
        timeout=90,
    )

    # Our status mirrors KubeRay's: not ready, and why, in KubeRay's words.
    def mirrored() -> dict[str, Any] | None:
        cd = cluster.get("chatd", name, APPS_NS)
        ready = condition(cd, "Ready")
        rs_ready = condition(cluster.get("rayservice", name, APPS_NS), "Ready")
        if ready and rs_ready and ready["reason"] == rs_ready["reason"]:
            return cd
        return None

    cd = eventually(mirrored, "Ready mirroring the RayService's Ready condition", timeout=60)
    assert condition(cd, "Ready")["status"] == "False"  # type: ignore[index]
    assert condition(cd, "InvalidSpec")["status"] == "False"  # type: ignore[index]
    assert cd["status"]["rayService"] == name
    printed = cluster.kubectl("get", "chatd", name, "-n", APPS_NS).stdout
    assert "smollm2,fake" in printed, printed


def test_an_edit_of_serving_updates_the_serve_config_in_place(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    sample = _cpu_sample()
    name = sample["metadata"]["name"]
    before = cluster.get("rayservice", name, APPS_NS)
    assert before is not None
    clusters_before = sorted(c["metadata"]["name"] for c in _rayclusters(cluster))
    assert len(clusters_before) == 1

    edited = copy.deepcopy(sample)
    edited["spec"]["serving"]["models"][1]["fake"]["tokens_per_second"] = 25
    cluster.apply(edited)

    def new_config() -> dict[str, Any] | None:
        rs = cluster.get("rayservice", name, APPS_NS)
        if rs and rs["spec"]["serveConfigV2"] != before["spec"]["serveConfigV2"]:
            return rs
        return None

    after = eventually(new_config, "the new serveConfigV2")
    assert "25" in after["spec"]["serveConfigV2"]
    # Only the serve config changed, so KubeRay updates the application in place:
    # no second (pending) RayCluster, which would double the cluster's pods and GPUs.
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    time.sleep(5)  # give KubeRay time to react, if it were going to start a new cluster
    # (With no kubelet the first cluster never turns Ready, so it stays KubeRay's
    # "pending" one; a change to the pods would replace it under a new name.)
    rs = cluster.get("rayservice", name, APPS_NS)
    pending = ((rs or {}).get("status") or {}).get("pendingServiceStatus") or {}
    assert pending.get("rayClusterName") in (None, *clusters_before), rs
    assert sorted(c["metadata"]["name"] for c in _rayclusters(cluster)) == clusters_before


def test_a_restarted_operator_duplicates_nothing(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = _cpu_sample()["metadata"]["name"]
    key_before = cluster.get("secret", jwt_secret_name(name), APPS_NS)
    assert key_before is not None
    operator.stop()
    operator.start()
    time.sleep(5)  # Kopf resumes every object on start
    assert [o["metadata"]["name"] for o in cluster.items("rayservice", APPS_NS)] == [name]
    assert len(_rayclusters(cluster)) == 1
    secrets = [
        s["metadata"]["name"]
        for s in cluster.items("secret", APPS_NS, f"{OWNER_LABEL}={name}")
    ]  # fmt: skip
    assert secrets == [jwt_secret_name(name)]
    key_after = cluster.get("secret", jwt_secret_name(name), APPS_NS)
    assert key_after is not None
    assert key_after["data"] == key_before["data"], "the signing key must never rotate silently"


@pytest.mark.parametrize(
    ("resource", "said"),
    [
        # The right to write Services, as a hand-edited or outdated chart might lack.
        ("services", "services"),
        # Owner references with blockOwnerDeletion need the owner's finalizers
        # subresource (OwnerReferencesPermissionEnforcement): without it, nothing can
        # be created as the ChatDeployment's, so the chart must grant it.
        ("chatdeployments/finalizers", "blockOwnerDeletion"),
    ],
)
def test_a_missing_permission_is_a_condition_and_an_event(
    cluster: Cluster, chart: dict[str, Any], operator: OperatorProcess, resource: str, said: str
) -> None:
    name = f"no-{resource.replace('/', '-')}"
    role_name = f"{chart['metadata']['name']}-cluster"  # the chart's ClusterRole
    role = cluster.get("clusterrole", role_name)
    assert role is not None
    original = copy.deepcopy(role)
    role["rules"] = [r for r in role["rules"] if resource not in r.get("resources", [])]
    assert len(role["rules"]) < len(original["rules"])
    for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
        role["metadata"].pop(key, None)
    cluster.apply(role)
    try:
        obj = chatd(name, {"serving": {"models": [{"name": "fake", "engine": "fake"}]}})
        cluster.apply(obj)

        def forbidden() -> dict[str, Any] | None:
            ready = condition(cluster.get("chatd", name, APPS_NS), "Ready")
            if ready and ready.get("reason") == "Forbidden":
                return ready
            return None

        ready = eventually(forbidden, "a Forbidden condition", timeout=60)
        assert ready["status"] == "False"
        assert said in ready["message"] and "RBAC" in ready["message"], ready

        def event() -> list[dict[str, Any]]:
            events = cluster.items("event", APPS_NS)
            return [
                e for e in events
                if e["involvedObject"].get("name") == name and e["reason"] == "Forbidden"
            ]  # fmt: skip

        found = eventually(event, "a Forbidden Event", timeout=60)
        assert found[0]["type"] == "Warning"
    finally:
        for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
            original["metadata"].pop(key, None)
        cluster.kubectl("replace", "-f", "-", stdin=json.dumps(original))
    # With the right restored, the next retry succeeds.
    eventually(
        lambda: cluster.get("service", service_name(name), APPS_NS),
        "the Service once the permission is back",
        timeout=90,
    )
    eventually(
        lambda: (
            (r := condition(cluster.get("chatd", name, APPS_NS), "Ready"))
            and r["reason"] != "Forbidden"
            and r
        ),
        "the Forbidden condition to clear",
        timeout=60,
    )
    cluster.kubectl("delete", "chatd", name, "-n", APPS_NS, "--wait=false")


def test_delete_is_garbage_collection_even_without_the_operator(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = _cpu_sample()["metadata"]["name"]
    operator.stop()  # nothing outside Kubernetes to clean: no finalizer may hold it
    try:
        cluster.kubectl("delete", "chatd", name, "-n", APPS_NS, "--timeout=60s")
        for kind, obj_name in [
            ("rayservice", name),
            ("service", service_name(name)),
            ("secret", jwt_secret_name(name)),
        ]:
            eventually(
                lambda kind=kind, obj_name=obj_name: cluster.get(kind, obj_name, APPS_NS) is None,
                f"the garbage collector to delete {kind} {obj_name}",
                timeout=90,
            )
        eventually(lambda: not _rayclusters(cluster), "the RayCluster to go", timeout=90)
        eventually(
            lambda: not cluster.items("pod", APPS_NS, "ray.io/node-type=head"),
            "the head Pod to go",
            timeout=90,
        )
    finally:
        operator.start()


def test_kubeconfig_of_the_operator_cannot_read_secrets_elsewhere(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    """Least privilege: the chart's account may not read Secrets of other namespaces."""
    kubeconfig = operator.workdir / "operator.kubeconfig"
    result = cluster.kubectl(
        "auth", "can-i", "get", "secrets", "-n", "kube-system", kubeconfig=kubeconfig, check=False
    )
    assert result.stdout.strip() == "no", (result.stdout, result.stderr)
    with pytest.raises(KubectlError, match=r"(?i)forbidden"):
        cluster.kubectl("get", "secrets", "-n", "kube-system", kubeconfig=kubeconfig)


def test_helm_upgrade_upgrades_the_crd(
    cluster: Cluster, chart: dict[str, Any], tmp_path: Path
) -> None:
    """CRDs under a chart's crds/ never upgrade; ours are templates, so they do."""
    newer = tmp_path / "chatfleet"
    shutil.copytree(ROOT / "charts" / "chatfleet", newer)
    crd_file = newer / "files" / "crds" / "chatfleet.dev_chatdeployments.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    column = {"name": "Upgraded", "type": "string", "jsonPath": ".status.rayService"}
    crd["spec"]["versions"][0]["additionalPrinterColumns"].append(column)
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
    try:
        cluster.helm("upgrade", RELEASE, str(newer), "-n", SYSTEM_NS)
        live = cluster.get("crd", "chatdeployments.chatfleet.dev")
        assert column in live["spec"]["versions"][0]["additionalPrinterColumns"]  # type: ignore[index]
    finally:
        cluster.helm("upgrade", RELEASE, str(ROOT / "charts" / "chatfleet"), "-n", SYSTEM_NS)
    live = cluster.get("crd", "chatdeployments.chatfleet.dev")
    assert column not in live["spec"]["versions"][0]["additionalPrinterColumns"]  # type: ignore[index]


def test_helm_uninstall_keeps_the_crds_and_every_chatdeployment(
    cluster: Cluster, chart: dict[str, Any], operator: OperatorProcess
) -> None:
    """Last: deleting a CRD would delete every ChatDeployment, so uninstall keeps them."""
    operator.stop()
    kept = chatd("kept", {"serving": {"models": [{"name": "fake", "engine": "fake"}]}})
    cluster.apply(kept)
    cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS)
    assert cluster.get("deployment", chart["metadata"]["name"], SYSTEM_NS) is None
    for name in ("chatdeployments.chatfleet.dev", "kopfpeerings.kopf.dev"):
        assert cluster.get("crd", name) is not None, name
    assert cluster.get("chatd", "kept", APPS_NS) is not None
