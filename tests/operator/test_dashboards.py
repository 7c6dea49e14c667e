"""The Grafana dashboards: well formed, on the templated data source, querying real metrics.

The chart ships them from ``charts/chatfleet/dashboards/``; ``manifests/grafana/`` holds
byte-for-byte copies for a plain import.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_helpers import ROOT
from prometheus_client import CollectorRegistry

CHART_DASHBOARDS = ROOT / "charts" / "chatfleet" / "dashboards"
GRAFANA_MANIFESTS = ROOT / "manifests" / "grafana"
DASHBOARDS = sorted(CHART_DASHBOARDS.glob("*.json"))
TEMPLATED_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TRACES_DATASOURCE = {"type": "tempo", "uid": "${traces}"}
METRIC = re.compile(r"\b(chatfleet_[a-z0-9_]+)")

# The series a family of each type exposes (prometheus_client names a Counter's family
# without its ``_total``, and a labelled family has no samples until a child exists).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def series_names(registry: CollectorRegistry) -> dict[str, tuple[str, ...]]:
    """Every series name a registry exposes, with the label names of its family."""
    names: dict[str, tuple[str, ...]] = {}
    for family in registry.collect():
        # prometheus_client keeps the label names on the collector only.
        collector = registry._names_to_collectors[family.name]
        labels = tuple(getattr(collector, "_labelnames", ()))
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = labels + (("le",) if suffix == "_bucket" else ())
        for sample in family.samples:
            names.setdefault(sample.name, labels)
    return names


def exported_metrics() -> dict[str, tuple[str, ...]]:
    """The series chatfleet exports (serving and operator), with their label names."""
    from chatfleet.operator._metrics import OperatorMetrics
    from chatfleet.serving.api._metrics import Metrics

    return series_names(Metrics().registry) | series_names(OperatorMetrics().registry)


def metrics_in(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queried_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The panels that query Prometheus (not rows, not the traces table)."""
    return (
        p
        for p in panels(board)
        if p.get("type") != "row" and p.get("datasource") != TRACES_DATASOURCE
    )


@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.stem)
def board(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_both_dashboards_ship() -> None:
    assert [p.name for p in DASHBOARDS] == ["chatfleet-operator.json", "chatfleet-serving.json"]


def test_uids_and_titles_are_unique() -> None:
    boards = [load(p) for p in DASHBOARDS]
    uids = [b["uid"] for b in boards]
    titles = [b["title"] for b in boards]
    assert all(uids) and len(set(uids)) == len(uids)
    assert all(titles) and len(set(titles)) == len(titles)


def test_panel_ids_are_unique_and_panels_do_not_overlap(board: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(board)]
    assert ids and len(set(ids)) == len(ids)
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_datasource_is_a_prometheus_variable(board: dict[str, Any]) -> None:
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"


def test_every_panel_and_target_uses_the_templated_datasource(board: dict[str, Any]) -> None:
    for panel in queried_panels(board):
        assert panel["datasource"] == TEMPLATED_DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == TEMPLATED_DATASOURCE, panel["title"]
            assert target["expr"].strip(), f"{panel['title']}: empty expr"
            assert target["refId"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]


def test_every_queried_metric_is_exported(board: dict[str, Any]) -> None:
    exported = exported_metrics()
    missing = {
        (panel["title"], metric)
        for panel in queried_panels(board)
        for target in panel["targets"]
        for metric in metrics_in(target["expr"])
        if metric not in exported
    }
    assert not missing, f"{board['uid']} queries metrics nobody exports: {sorted(missing)}"


def test_metric_names_check_catches_a_typo() -> None:
    exported = exported_metrics()
    assert "chatfleet_http_requests_total" in exported
    assert "chatfleet_time_to_first_token_seconds_bucket" in exported
    assert "chatfleet_operator_chatdeployments" in exported
    assert "chatfleet_operator_reconciles_total" in exported
    assert "chatfleet_http_requests" not in exported  # the family name, not a series
    assert metrics_in("rate(chatfleet_htp_requests_total[5m])") - set(exported)


def test_operator_dashboard_shows_chatdeployments_by_ready_condition() -> None:
    board = load(CHART_DASHBOARDS / "chatfleet-operator.json")
    (panel,) = [p for p in panels(board) if p["title"] == "ChatDeployments by Ready condition"]
    assert [t["expr"] for t in panel["targets"]] == [
        "sum by (ready) (chatfleet_operator_chatdeployments)"
    ]


def test_grafana_manifests_equal_the_chart_dashboards() -> None:
    copies = sorted(p.name for p in GRAFANA_MANIFESTS.glob("*.json"))
    assert copies == [p.name for p in DASHBOARDS]
    for path in DASHBOARDS:
        assert (GRAFANA_MANIFESTS / path.name).read_bytes() == path.read_bytes(), (
            f"manifests/grafana/{path.name} differs from the chart's: "
            "cp charts/chatfleet/dashboards/*.json manifests/grafana/"
        )


def test_serving_dashboard_filters_by_namespace_and_model() -> None:
    board = load(CHART_DASHBOARDS / "chatfleet-serving.json")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["namespace"]["includeAll"] and variables["model"]["includeAll"]
    exported = exported_metrics()
    for panel in queried_panels(board):
        for target in panel["targets"]:
            for metric in metrics_in(target["expr"]):
                # Every selector is narrowed by the variables its series carry.
                selector = re.search(re.escape(metric) + r"\{([^}]*)\}", target["expr"])
                assert selector, f"{panel['title']}: {metric} has no selector"
                assert 'namespace=~"$namespace"' in selector.group(1), panel["title"]
                if "model" in exported[metric]:
                    assert 'model=~"$model"' in selector.group(1), panel["title"]


def test_slow_generations_link_to_their_traces() -> None:
    """The way from the dashboard to one slow request's trace: a Tempo search table."""
    board = load(CHART_DASHBOARDS / "chatfleet-serving.json")
    (traces,) = [v for v in board["templating"]["list"] if v["name"] == "traces"]
    assert (traces["type"], traces["query"]) == ("datasource", "tempo")
    (panel,) = [p for p in panels(board) if p.get("datasource") == TRACES_DATASOURCE]
    (target,) = panel["targets"]
    assert target["datasource"] == TRACES_DATASOURCE
    assert target["queryType"] == "traceql"
    # It selects the spans the engines emit (chatfleet.serving.engines._tracing).
    assert 'span.gen_ai.operation.name = "chat"' in target["query"]
    assert "span.gen_ai.request.model" in target["query"]
    assert "duration >" in target["query"]
