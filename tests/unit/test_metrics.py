"""The ingress metrics: recorded once in one registry, exported from there, never dying.

Ray's side is a stand-in here that keeps what Ray's metrics agent would export and
checks values and tags as ``ray.util.metrics`` does (positive increments, string tags,
ASCII only); tests/integration/test_ray_metrics.py runs the same against real Ray.
"""

from __future__ import annotations

import logging
import math
import threading
import types
from collections import defaultdict

import pytest
from tests.fakes.odd_metrics import RAY_MODELE, drive_odd_inputs, moved_samples

from chatfleet.serving.api import Metrics, _instruments

Series = tuple[str, tuple[tuple[str, str], ...]]


class FakeRay:
    """What Ray's agent would export: counter totals, gauge levels, histogram samples."""

    def __init__(self) -> None:
        self.created: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {}
        self.totals: dict[Series, float] = defaultdict(float)
        self.levels: dict[Series, float] = {}
        self.observed: dict[Series, list[float]] = defaultdict(list)
        self.calls = 0
        self.fail: dict[str, BaseException] = {}  # metric name -> raised at every call
        ray = self

        class Metric:
            kind = ""

            def __init__(
                self,
                name: str,
                description: str = "",
                tag_keys: tuple[str, ...] = (),
                boundaries: list[float] | None = None,
            ) -> None:
                self.name, self.tag_keys = name, tag_keys
                ray.created[name] = (self.kind, tuple(tag_keys), tuple(boundaries or ()))

            def _series(self, value: float, tags: dict[str, str]) -> Series:
                ray.calls += 1
                if self.name in ray.fail:
                    raise ray.fail[self.name]
                if not isinstance(value, (int, float)):
                    raise TypeError(f"value must be int or float, got {type(value)}.")
                for v in tags.values():
                    if not isinstance(v, str):
                        raise TypeError(f"Tag values must be str, got {type(v)}.")
                    v.encode("ascii")  # what Ray's Cython layer does
                return self.name, tuple(sorted(tags.items()))

        class Counter(Metric):
            kind = "counter"

            def inc(self, value: float, tags: dict[str, str]) -> None:
                if value <= 0:
                    raise ValueError(f"value must be >0, got {value}")
                ray.totals[self._series(value, tags)] += value

        class Gauge(Metric):
            kind = "gauge"

            def set(self, value: float, tags: dict[str, str]) -> None:
                ray.levels[self._series(value, tags)] = value

        class Histogram(Metric):
            kind = "histogram"

            def observe(self, value: float, tags: dict[str, str]) -> None:
                ray.observed[self._series(value, tags)].append(value)

        self.module = types.SimpleNamespace(Counter=Counter, Gauge=Gauge, Histogram=Histogram)

    def render(self, buckets: dict[str, tuple[float, ...]]) -> str:
        """Ray's series as its agent exposes them: ``ray_`` names, labels of its own."""
        lines = []

        def line(name: str, tags: tuple[tuple[str, str], ...], value: float) -> None:
            labels = ",".join(f'{k}="{_escaped(v)}"' for k, v in (*tags, ("WorkerId", "01")))
            lines.append(f"ray_{name}{{{labels}}} {value}")

        for (name, tags), total in self.totals.items():
            line(name, tags, total)
        for (name, tags), level in self.levels.items():
            line(name, tags, level)
        for (name, tags), values in self.observed.items():
            for bound in (*buckets[name], math.inf):
                le = "+Inf" if bound == math.inf else str(bound)
                line(f"{name}_bucket", (*tags, ("le", le)), sum(1 for v in values if v <= bound))
            line(f"{name}_count", tags, len(values))
        return "\n".join(lines) + "\n"


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@pytest.fixture
def ray(monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    from chatfleet.serving.app import _metrics as app_metrics

    fake = FakeRay()
    monkeypatch.setattr(app_metrics, "serve_metrics", fake.module)
    return fake


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_every_instrument_is_exported_with_its_name_kind_labels_and_buckets(
    ray: FakeRay,
) -> None:
    from chatfleet.serving import app

    metrics = Metrics()
    app.RayMetricsMirror(metrics)
    assert set(ray.created) == {i.name for i in metrics.instruments}
    families = {f.name: f for f in metrics.registry.collect()}
    for instrument in metrics.instruments:
        kind, tag_keys, buckets = ray.created[instrument.name]
        family = families[instrument.name.removesuffix("_total")]
        assert kind == family.type == instrument.kind
        assert tag_keys == instrument.labelnames
        if kind == "histogram":
            assert buckets == instrument.buckets
    assert ray.created["chatfleet_time_to_first_token_seconds"][2][:1] == (0.005,)
    assert "chatfleet_metrics_errors_total" in ray.created


def test_ray_series_equal_the_registry_after_odd_inputs(ray: FakeRay) -> None:
    from chatfleet.serving import app

    metrics = Metrics()
    mirror = app.RayMetricsMirror(metrics, interval_s=3600)  # exported by hand
    drive_odd_inputs(metrics)
    mirror.export()
    drive_odd_inputs(metrics)  # the path still works after a pass with every oddity
    mirror.export()
    mirror.export()  # the errors counted by the last pass reach Ray too

    assert sample(metrics, "chatfleet_tokens_total", model="m", type="output") == 128
    assert sample(metrics, "chatfleet_tokens_total", model="m", type="input") == 24
    assert sample(metrics, "chatfleet_time_to_first_token_seconds_count", model="m") == 2
    assert sample(metrics, "chatfleet_active_streams", model="m") == 2
    errors = {
        reason: sample(metrics, "chatfleet_metrics_errors_total", reason=reason)
        for reason in ("negative_increment", "invalid_value", "bad_labels", "label_escaped")
    }
    # Per round: -3; NaN, inf, None, two observations and a gauge step; the short label
    # set. Escapes once per series: the surrogate here, "modèle" for Ray.
    assert errors == {
        "negative_increment": 2,
        "invalid_value": 12,
        "bad_labels": 2,
        "label_escaped": 2,
    }
    assert b'code="bad\\\\ud800code"' in metrics.render()

    buckets = {i.name: i.buckets for i in metrics.instruments if i.kind == "histogram"}
    local = moved_samples(metrics.render().decode(), metrics)
    exported = moved_samples(ray.render(buckets), metrics, prefix="ray_")
    modele = {k for k in local if ("model", "modèle") in k[1]}
    assert modele  # and in Ray with the escaped label value:
    assert {k: v for k, v in local.items() if k not in modele} == {
        k: v for k, v in exported.items() if ("model", RAY_MODELE) not in k[1]
    }
    assert (
        exported[("chatfleet_tokens_total", (("model", RAY_MODELE), ("type", "output")))]
        == local[("chatfleet_tokens_total", (("model", "modèle"), ("type", "output")))]
    )


def test_counters_send_only_what_they_gained(ray: FakeRay) -> None:
    from chatfleet.serving import app

    metrics = Metrics()
    mirror = app.RayMetricsMirror(metrics, interval_s=3600)
    out = metrics.tokens.labels("m", "output")
    for _ in range(3):
        out.inc(5)
    metrics.tokens.labels("m", "input").inc(0)
    mirror.export()
    series = ("chatfleet_tokens_total", (("model", "m"), ("type", "output")))
    assert ray.totals == {series: 15}  # summed: one Ray call; the zero: none
    calls = ray.calls
    mirror.export()
    assert ray.totals == {series: 15}
    assert ray.calls == calls  # nothing moved, nothing sent (no gauges here)
    out.inc(2)
    mirror.export()
    assert ray.totals == {series: 17}


def test_gauges_are_set_again_at_every_pass(ray: FakeRay) -> None:
    # Ray's agent forgets a gauge series not set within two report intervals.
    from chatfleet.serving import app

    metrics = Metrics()
    mirror = app.RayMetricsMirror(metrics, interval_s=3600)
    metrics.websocket_connections.labels("chat").inc()
    mirror.export()
    ray.levels.clear()
    mirror.export()
    assert ray.levels == {("chatfleet_websocket_connections", (("endpoint", "chat"),)): 1}


def test_an_exception_in_ray_is_counted_logged_once_and_the_rest_still_exports(
    ray: FakeRay, caplog: pytest.LogCaptureFixture
) -> None:
    from chatfleet.serving import app

    metrics = Metrics()
    mirror = app.RayMetricsMirror(metrics, interval_s=3600)
    ray.fail["chatfleet_tokens_total"] = RuntimeError("the agent went away")
    with caplog.at_level(logging.WARNING, logger=_instruments.__name__):
        for _ in range(3):
            metrics.tokens.labels("m", "output").inc(1)
            metrics.generations.labels("m", "stop").inc()
            mirror.export()
    assert sample(metrics, "chatfleet_metrics_errors_total", reason="export_failed") == 3
    assert ray.totals[("chatfleet_generations_total", (("finish_reason", "stop"), ("model", "m")))]
    assert [r.getMessage() for r in caplog.records if "export_failed" in r.getMessage()] == [
        "metrics: export_failed on chatfleet_tokens_total (RuntimeError('the agent went away'));"
        " counted in chatfleet_metrics_errors_total, not logged again"
    ]
    del ray.fail["chatfleet_tokens_total"]
    metrics.tokens.labels("m", "output").inc(1)
    mirror.export()  # what failed is not sent twice; what came after is
    assert ray.totals[("chatfleet_tokens_total", (("model", "m"), ("type", "output")))] == 1


def test_odd_inputs_are_logged_once_per_reason_and_metric(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger=_instruments.__name__):
        for _ in range(5):
            metrics.tokens.labels("m", "output").inc(-1)
            metrics.generations.labels("m", "stop").inc(-1)
    assert sample(metrics, "chatfleet_metrics_errors_total", reason="negative_increment") == 10
    assert len(caplog.records) == 2
    assert sample(metrics, "chatfleet_tokens_total", model="m", type="output") == 0


def test_the_export_thread_outlives_failures(ray: FakeRay) -> None:
    from chatfleet.serving import app

    metrics = Metrics()
    mirror = app.RayMetricsMirror(metrics, interval_s=0.01)
    ray.fail["chatfleet_tokens_total"] = ValueError("value must be >0, got 0")
    passes = threading.Semaphore(0)
    real_export = mirror.export

    def export() -> None:
        real_export()
        passes.release()

    mirror.export = export  # type: ignore[method-assign]
    mirror.start()
    try:
        for amount in (1, 2, 3):
            metrics.tokens.labels("m", "output").inc(amount)
            metrics.errors.labels("not_found").inc()
            for _ in range(2):  # a whole pass after the increment
                assert passes.acquire(timeout=30)
    finally:
        mirror.stop()
    assert ray.totals[("chatfleet_errors_total", (("code", "not_found"),))] == 3
    assert sample(metrics, "chatfleet_metrics_errors_total", reason="export_rejected") == 3


def test_without_an_exporter_only_the_registry_records() -> None:
    metrics = Metrics()
    metrics.errors.labels("not_found").inc()
    metrics.time_to_first_token.labels("m").observe(0.1)
    assert sample(metrics, "chatfleet_errors_total", code="not_found") == 1
    assert b"chatfleet_errors_total" in metrics.render()
    assert sample(metrics, "chatfleet_time_to_first_token_seconds_count", model="m") == 1


def test_instruments_are_declared_once() -> None:
    metrics = Metrics()
    names = [i.name for i in metrics.instruments]
    assert len(names) == len(set(names))
    registered = {f.name for f in metrics.registry.collect()}
    assert {n.removesuffix("_total") for n in names} == registered


def test_histograms_reach_ray_bucket_for_bucket(ray: FakeRay) -> None:
    # Ray's agent keeps bucket counts only, so the mirror observes one value inside
    # each bucket per observation it gained: on bounds, between them, past the last.
    from chatfleet.serving import app

    metrics = Metrics()
    mirror = app.RayMetricsMirror(metrics, interval_s=3600)
    ttft = metrics.time_to_first_token.labels("m")
    bounds = metrics.time_to_first_token.buckets
    for value in (0.0, *bounds, *(b * 1.5 for b in bounds), -1.0, 1e9):
        ttft.observe(value)
        if value > 1:
            mirror.export()  # several passes: gains add up
    mirror.export()
    buckets = {i.name: i.buckets for i in metrics.instruments if i.kind == "histogram"}
    local = moved_samples(metrics.render().decode(), metrics)
    assert moved_samples(ray.render(buckets), metrics, prefix="ray_") == local
    assert local[("chatfleet_time_to_first_token_seconds_count", (("model", "m"),))] == 27
