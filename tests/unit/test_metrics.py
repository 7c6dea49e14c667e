"""The ingress metrics: one registry for /metrics, mirrored into a second backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
