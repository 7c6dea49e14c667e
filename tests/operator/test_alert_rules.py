"""The alerting rules: one Prometheus rule file, checked and unit-tested by promtool.

``charts/chatfleet/rules/chatfleet-alerts.yaml`` is the source; the chart renders it into
a PrometheusRule and ``manifests/prometheus/`` holds a byte-for-byte copy.
"""

from __future__ import annotations

import logging
import re
import subprocess
from typing import Any

import kopf
import pytest
import yaml
from operator_helpers import DATA, ROOT
from test_dashboards import exported_metrics, metrics_in
from tests.fakes.prometheus import require_binary

from chatfleet.operator import OperatorSettings, Reconciler
from chatfleet.operator._kube import KubeError

RULES = ROOT / "charts" / "chatfleet" / "rules" / "chatfleet-alerts.yaml"
PLAIN_COPY = ROOT / "manifests" / "prometheus" / "chatfleet-alerts.yaml"
PROMTOOL_TESTS = DATA / "prometheus" / "chatfleet-alerts.test.yaml"
ALERTS = {
    "ChatfleetHighErrorRatio",
    "ChatfleetTimeToFirstTokenSLOBurn",
    "ChatfleetOperatorReconcileFailures",
    "ChatfleetDeploymentNotReady",
}
# metric{label="value", ...}: the selectors of an expression, to check their label names.
SELECTOR = re.compile(r"\b(chatfleet_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def rule(name: str) -> dict[str, Any]:
    (found,) = [r for r in rules() if r.get("alert") == name]
    return found


def test_rule_file_has_the_alerts_each_complete() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    group_names = [g["name"] for g in doc["groups"]]
    assert len(set(group_names)) == len(group_names)
    names = [r["alert"] for r in rules()]
    assert sorted(names) == sorted(ALERTS)
    for r in rules():
        assert r["expr"].strip()
        assert re.fullmatch(r"[0-9]+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_rules_query_metrics_and_labels_that_are_exported() -> None:
    exported = exported_metrics()
    for r in rules():
        used = metrics_in(r["expr"])
        assert used, r["alert"]
        assert used <= set(exported), f"{r['alert']}: {sorted(used - set(exported))}"
        for metric, matchers in SELECTOR.findall(r["expr"]):
            for label, _op, _value in MATCHER.findall(matchers):
                assert label in exported[metric], f"{r['alert']}: {metric} has no {label!r}"


def test_slo_burn_alert_is_the_multi_window_pattern() -> None:
    expr = rule("ChatfleetTimeToFirstTokenSLOBurn")["expr"]
    assert expr.count('chatfleet_time_to_first_token_seconds_bucket{le="2.5"}') == 2
    assert "[1h]" in expr and "[5m]" in expr and re.search(r"\band\b", expr)
    assert expr.count("> (14.4 * 0.05)") == 2  # burn factor x the 5% error budget
    assert "model" in expr


def test_error_ratio_guards_the_division() -> None:
    expr = rule("ChatfleetHighErrorRatio")["expr"]
    assert 'status=~"5.."' in expr
    assert "[5m])) > 0)" in expr  # an idle service divides by nothing, not by zero
    assert expr.rstrip().endswith("> 0.05")


class _FailingKube:
    """A Kube whose writes fail with a server error (the JWT Secret already exists)."""

    async def get(self, *_: Any) -> dict[str, Any]:
        return {"data": {"signing-key": "eA=="}}

    async def create(self, obj: dict[str, Any]) -> None:
        return None  # 409: it exists

    async def serves(self, *_: Any) -> bool:
        return False

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        raise KubeError(500, "etcd is having a bad day")


async def _failing_kube() -> Any:
    return _FailingKube()


async def test_reconcile_failure_alert_matches_what_a_failed_reconcile_records() -> None:
    rec = Reconciler(OperatorSettings(metrics_enabled=False), kube_factory=_failing_kube)
    body = kopf.Body(
        {
            "apiVersion": "chatfleet.dev/v1alpha1",
            "kind": "ChatDeployment",
            "metadata": {"name": "demo", "namespace": "team-a", "uid": "u1", "generation": 1},
            "spec": {"serving": {"models": [{"name": "fake", "engine": "fake"}]}},
        }
    )
    with pytest.raises(kopf.TemporaryError):
        await rec.reconcile(
            body=body,
            name="demo",
            namespace="team-a",
            patch=kopf.Patch(),
            logger=logging.getLogger("test"),
            trigger="update",
        )
    recorded = {
        sample.labels["result"]
        for family in rec.metrics.registry.collect()
        if family.name == "chatfleet_operator_reconciles"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.value > 0
    }
    (selector,) = SELECTOR.findall(rule("ChatfleetOperatorReconcileFailures")["expr"])
    matchers = {label: value for label, _op, value in MATCHER.findall(selector[1])}
    assert recorded == {matchers["result"]} == {"error"}


def test_not_ready_alert_counts_every_status_but_true() -> None:
    from chatfleet.operator._metrics import READY_STATES

    expr = rule("ChatfleetDeploymentNotReady")["expr"]
    assert 'chatfleet_operator_chatdeployments{ready!="True"}' in expr
    assert "True" in READY_STATES
    assert rule("ChatfleetDeploymentNotReady")["for"] == "15m"


def test_plain_prometheus_copy_equals_the_chart_rules() -> None:
    assert PLAIN_COPY.read_bytes() == RULES.read_bytes(), (
        "manifests/prometheus/chatfleet-alerts.yaml differs from the chart's rule file: "
        "cp charts/chatfleet/rules/chatfleet-alerts.yaml manifests/prometheus/"
    )


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_checks_the_rule_file() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def test_promtool_unit_tests_fire_and_stay_quiet_as_designed() -> None:
    # Series in, alerts (with rendered annotations) out: see the test file's cases.
    out = _promtool("test", "rules", str(PROMTOOL_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
