"""The ingress metrics: one registry for /metrics, mirrored into a second backend."""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import pytest

from chatfleet.serving.api import Metrics

Record = Callable[[float, dict[str, str]], None]


class RecordingMirror:
    """A mirror that keeps every recorded value, per instrument."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.buckets: dict[str, tuple[float, ...]] = {}
        self.values: dict[str, list[tuple[float, dict[str, str]]]] = {}

    def _recorder(self, kind: str, name: str) -> Record:
        self.kinds[name] = kind
        self.values[name] = []
        return lambda value, tags: self.values[name].append((value, dict(tags)))

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> Record:
        return self._recorder("counter", name)

    def histogram(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> Record:
        self.buckets[name] = tuple(buckets)
        return self._recorder("histogram", name)

    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> Record:
        return self._recorder("gauge", name)


def test_every_instrument_is_mirrored_with_the_same_name_kind_and_buckets() -> None:
    mirror = RecordingMirror()
    metrics = Metrics(mirror=mirror)
    exported = {
        family.name: family.type for family in metrics.registry.collect()
    }  # counters lose their _total suffix here
    assert {n.removesuffix("_total") for n in mirror.kinds} == set(exported)
    for name, kind in mirror.kinds.items():
        assert exported[name.removesuffix("_total")] == kind
    assert mirror.buckets["chatfleet_time_to_first_token_seconds"][0] == 0.005
    assert mirror.buckets["chatfleet_time_to_first_token_seconds"][-1] == 30


def test_values_reach_both_backends() -> None:
    mirror = RecordingMirror()
    metrics = Metrics(mirror=mirror)
    metrics.tokens.labels("m", "output").inc(64)
    metrics.tokens.labels("m", "output").inc(3)
    metrics.time_to_first_token.labels("m").observe(0.2)
    metrics.routing_duration.observe(0.01)

    sample = metrics.registry.get_sample_value
    assert sample("chatfleet_tokens_total", {"model": "m", "type": "output"}) == 67
    assert mirror.values["chatfleet_tokens_total"] == [
        (64, {"model": "m", "type": "output"}),
        (3, {"model": "m", "type": "output"}),
    ]
    assert mirror.values["chatfleet_time_to_first_token_seconds"] == [(0.2, {"model": "m"})]
    assert mirror.values["chatfleet_routing_duration_seconds"] == [(0.01, {})]
    assert sample("chatfleet_routing_duration_seconds_count") == 1


def test_gauges_mirror_their_current_value_not_the_step() -> None:
    # Ray's gauges only know set(): inc/dec must turn into the running value.
    mirror = RecordingMirror()
    metrics = Metrics(mirror=mirror)
    streams = metrics.active_streams.labels("m")
    streams.inc()
    streams.inc()
    streams.dec()
    assert [v for v, _ in mirror.values["chatfleet_active_streams"]] == [1, 2, 1]
    assert metrics.registry.get_sample_value("chatfleet_active_streams", {"model": "m"}) == 1


def test_without_a_mirror_only_the_registry_records() -> None:
    metrics = Metrics()
    metrics.errors.labels("not_found").inc()
    assert metrics.registry.get_sample_value("chatfleet_errors_total", {"code": "not_found"}) == 1
    assert b"chatfleet_errors_total" in metrics.render()


class _RayMetric:
    """Stands in for ray.serve.metrics' Counter/Gauge/Histogram: keeps the calls."""

    calls: list[tuple[str, str, float, dict[str, str]]] = []

    def __init__(self, name: str, **_: object) -> None:
        self.name = name

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("inc", self.name, value, dict(tags)))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", self.name, value, dict(tags)))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", self.name, value, dict(tags)))


def test_ray_mirror_sums_counters_between_flushes(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatfleet.serving import app
    from chatfleet.serving.app import _metrics

    fake = types.SimpleNamespace(Counter=_RayMetric, Gauge=_RayMetric, Histogram=_RayMetric)
    monkeypatch.setattr(_metrics, "serve_metrics", fake)
    monkeypatch.setattr(_RayMetric, "calls", [])
    mirror = app.RayMetricsMirror(refresh_s=3600)  # flushed by hand below
    metrics = Metrics(mirror=mirror)
    out = metrics.tokens.labels("m", "output")
    for _ in range(3):
        out.inc(5)
    metrics.tokens.labels("m", "input").inc(7)
    metrics.time_to_first_token.labels("m").observe(0.2)  # histograms: at once
    assert [c[0] for c in _RayMetric.calls] == ["observe"]
    mirror.flush()
    incs = [c[1:] for c in _RayMetric.calls if c[0] == "inc"]
    assert sorted(incs, key=str) == sorted(
        [
            ("chatfleet_tokens_total", 15, {"model": "m", "type": "output"}),
            ("chatfleet_tokens_total", 7, {"model": "m", "type": "input"}),
        ],
        key=str,
    )
    _RayMetric.calls.clear()
    out.inc(2)
    mirror.flush()
    mirror.flush()  # nothing new: nothing added
    assert [c[1:] for c in _RayMetric.calls if c[0] == "inc"] == [
        ("chatfleet_tokens_total", 2, {"model": "m", "type": "output"})
    ]
