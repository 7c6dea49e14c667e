"""The Helm chart, rendered and linted offline with Helm's own engine (helm-python-sdk)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from operator_helpers import DATA, ROOT

CHART = ROOT / "charts" / "chatfleet"
VALUES = sorted((DATA / "chart-values").glob("*.yaml"))
K8S_VERSION = kubernetes_validate.latest_version()
CORE_KINDS = {
    "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
    "Service", "ConfigMap",
}  # fmt: skip


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any], namespace: str = "chatfleet-system") -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(values, name="cf", namespace=namespace, is_install=True)
    finally:
        chart.close()
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: dict[str, Any]) -> str:
    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(values, name="cf", namespace="chatfleet-system")
    finally:
        chart.close()
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# What the operator calls (see chatfleet.operator._kube / _operator and Kopf itself).
MANAGED = (
    {("chatfleet.dev", "chatdeployments", v) for v in ("get", "list", "watch", "patch")}
    | {("chatfleet.dev", "chatdeployments/status", "patch")}
    | {("chatfleet.dev", "chatdeployments/finalizers", "update")}
    | {("ray.io", "rayservices", v) for v in ("list", "watch", "create", "patch")}
    | {("", "services", v) for v in ("list", "watch", "create", "patch")}
    | {("", "secrets", "create")}
    | {("monitoring.coreos.com", "servicemonitors", v) for v in ("create", "patch")}
    | {("", "events", "create")}
)
DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}


@pytest.mark.parametrize("values_file", VALUES, ids=lambda p: p.stem)
def test_renders_lints_and_validates(values_file: Path) -> None:
    values = load_values(values_file)
    result = helm_python.lint(str(CHART), values, strict=True, kube_version="1.32.0")
    assert result["errors"] == [], result
    docs = render(values)
    assert by_kind(docs, "Deployment"), "no operator Deployment"
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "cf"


def test_default_install_is_cluster_wide_and_least_privilege() -> None:
    docs = render({})
    (role,) = by_kind(docs, "ClusterRole")
    assert rules_of(role) == MANAGED | DISCOVERY
    assert not by_kind(docs, "Role")
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CHATFLEET_OPERATOR_NAMESPACES"] == "[]"
    assert "CHATFLEET_OPERATOR_PEERING" not in env
    assert container["args"][0] == "run"
    assert container["image"] == "ghcr.io/chatfleet/chatfleet-operator:0.1.0"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    dashboards = by_kind(docs, "ConfigMap")
    assert {key for d in dashboards for key in d["data"]} == {
        "chatfleet-operator.json",
        "chatfleet-serving.json",
    }
    for dashboard in dashboards:
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert not [d for d in docs if d["kind"] == "PodMonitor"]


def test_secret_reads_are_opt_in() -> None:
    (role,) = by_kind(render({"rbac": {"readSecrets": True}}), "ClusterRole")
    assert rules_of(role) == MANAGED | DISCOVERY | {("", "secrets", "get")}


def test_namespaced_ha_uses_roles_and_peering() -> None:
    docs = render(load_values(DATA / "chart-values" / "namespaced-ha.yaml"))
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rules_of(role) == MANAGED | {
            ("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")
        }
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert rules_of(cluster_role) == DISCOVERY | {
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }
    bindings = by_kind(docs, "RoleBinding")
    assert {b["subjects"][0]["namespace"] for b in bindings} == {"chatfleet-system"}
    (deployment,) = by_kind(docs, "Deployment")
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert json.loads(env["CHATFLEET_OPERATOR_NAMESPACES"]) == ["team-a", "team-b"]
    assert env["CHATFLEET_OPERATOR_PEERING"] == "chatfleet"
    assert deployment["spec"]["replicas"] == 2
    peerings = [d for d in docs if d["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert {p["metadata"]["name"] for p in peerings} == {"chatfleet"}
    cluster_wide = render({"replicaCount": 3})
    (peering,) = [d for d in cluster_wide if d["kind"] == "ClusterKopfPeering"]
    assert peering["metadata"]["name"] == "chatfleet"
    assert not [d for d in render({}) if "Peering" in d["kind"]]


def test_env_matches_operator_settings() -> None:
    # Every CHATFLEET_OPERATOR_* variable the chart sets is a real setting.
    from chatfleet.operator import OperatorSettings

    docs = render(load_values(DATA / "chart-values" / "namespaced-ha.yaml"))
    (deployment,) = by_kind(docs, "Deployment")
    env = {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"].startswith("CHATFLEET_OPERATOR_")
    }
    fields = {f"CHATFLEET_OPERATOR_{name.upper()}" for name in OperatorSettings.model_fields}
    assert set(env) <= fields
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env):
        settings = OperatorSettings()
    assert settings.namespaces == ["team-a", "team-b"]
    assert settings.peering == "chatfleet"
    assert settings.missing_secret_retry_s == 45


def test_pod_monitor_and_minimal() -> None:
    docs = render(load_values(DATA / "chart-values" / "monitoring.yaml"))
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"
    docs = render(load_values(DATA / "chart-values" / "minimal.yaml"))
    assert {d["kind"] for d in docs} == {"Deployment"}
    (deployment,) = docs
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operators"


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": -1},
        {"unknownKey": True},
        {"image": {"pullPolicy": "Sometimes"}},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"metrics": {"port": 8081}},  # clashes with the liveness port
        {"operator": {"missingSecretRetrySeconds": 0}},
        {"rbac": {"readSecrets": "yes"}},
        {"alerts": {"enabled": "yes"}},
        {"alerts": {"labels": {"release": 1}}},
        {"tracing": {"otlpProtocol": "thrift"}},
        {"tracing": {"otlpEndpoint": "collector:4317"}},  # a URL, with its scheme
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    chart = helm_python.Chart.load(str(CHART))
    try:
        with pytest.raises(helm_python.HelmError):
            chart.render(values, name="cf", namespace="x")
    finally:
        chart.close()


def test_notes_print_the_next_command() -> None:
    text = notes({})
    assert "kubectl apply -f" in text and "kubectl get chatd" in text
    assert "watching all namespaces" in text
    assert "team-a, team-b" in notes({"watchNamespaces": ["team-a", "team-b"]})


def test_chart_crds_are_templates_that_upgrade_and_stay() -> None:
    files = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    assert files == ["chatfleet.dev_chatdeployments.yaml", "kopf.dev_clusterkopfpeerings.yaml"]
    assert not (CHART / "crds").exists()  # Helm would install those once, never upgrade
    crds = by_kind(render({}), "CustomResourceDefinition")
    sources = {
        doc["metadata"]["name"]: doc
        for name in files
        for doc in yaml.safe_load_all((CHART / "files" / "crds" / name).read_text())
    }
    assert (
        sorted(c["metadata"]["name"] for c in crds)
        == sorted(sources)
        == [
            "chatdeployments.chatfleet.dev",
            "clusterkopfpeerings.kopf.dev",
            "kopfpeerings.kopf.dev",
        ]
    )
    for crd in crds:
        # Rendered unchanged but for the chart's labels and the keep policy.
        assert crd["spec"] == sources[crd["metadata"]["name"]]["spec"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    for crd in by_kind(render({"crds": {"keep": False}}), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})
    assert not by_kind(render({"crds": {"install": False}}), "CustomResourceDefinition")


def test_values_are_documented() -> None:
    # helm-docs style: every value has a `# --` comment above it or above an ancestor.
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        while (
            j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --")
        ):
            j -= 1  # helm-docs continues a `# --` comment over the following `#` lines
        own = j >= 0 and lines[j].strip().startswith("# --")
        documented = own or any(d for _, d in stack)
        key, _, rest = stripped.partition(":")
        if rest.strip() and not documented:
            undocumented.append(key)
        stack.append((indent, documented))
    assert not undocumented


def test_readme_lists_every_documented_value() -> None:
    readme = (CHART / "README.md").read_text()
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.partition(":")[0]
        path = ".".join([k for _, k in stack] + [key])
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and "# --" not in lines[j]:
            j -= 1
        if j >= 0 and lines[j].strip().startswith("# --"):
            assert f"| `{path}` |" in readme, f"{path} missing from the chart README"
        stack.append((indent, key))


def test_alerts_are_off_by_default_and_render_the_rule_file() -> None:
    assert not by_kind(render({}), "PrometheusRule")
    values = {"alerts": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}
    result = helm_python.lint(str(CHART), values, strict=True, kube_version="1.32.0")
    assert result["errors"] == [], result
    (rule,) = by_kind(render(values), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "chatfleet-system"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == "cf"
    # The rule file is the single source: the rendered groups are exactly its groups.
    source = yaml.safe_load((CHART / "rules" / "chatfleet-alerts.yaml").read_text())
    assert rule["spec"] == {"groups": source["groups"]}


def test_tracing_env_only_with_an_endpoint() -> None:
    from chatfleet.operator import OperatorSettings

    def operator_env(values: dict[str, Any]) -> dict[str, str]:
        (deployment,) = by_kind(render(values), "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in container["env"] if "value" in e}

    assert not {k for k in operator_env({}) if "OTLP" in k}
    assert not {k for k in operator_env({"tracing": {"otlpProtocol": "grpc"}}) if "OTLP" in k}
    env = operator_env(
        {
            "tracing": {
                "otlpEndpoint": "http://otel-collector.observability:4317",
                "otlpProtocol": "grpc",
            }
        }
    )
    assert env["CHATFLEET_OPERATOR_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert env["CHATFLEET_OPERATOR_OTLP_PROTOCOL"] == "grpc"
    default_protocol = operator_env({"tracing": {"otlpEndpoint": "http://c:4318"}})
    assert default_protocol["CHATFLEET_OPERATOR_OTLP_PROTOCOL"] == "http/protobuf"
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {k: v for k, v in env.items() if "OTLP" in k}):
        settings = OperatorSettings()
    assert settings.otlp_endpoint == "http://otel-collector.observability:4317"
    assert settings.otlp_protocol == "grpc"
