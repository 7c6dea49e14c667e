"""The ingress metrics, mirrored into Ray's metrics system (`RayMetricsMirror`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ray.serve import metrics as serve_metrics

_Record = Callable[[float, dict[str, str]], None]


def _tag_keys(labels: Sequence[str]) -> Any:
    return tuple(labels)  # Ray annotates tag_keys as Tuple[str] where it means Tuple[str, ...]


class RayMetricsMirror:
    """Mirrors the ingress metrics into Ray's metrics system.

    Each node's metrics agent exports them on the node's metrics port (8080 in the
    cluster) as ``ray_<name>`` with the replica's ``deployment``/``replica`` labels: the
    per-replica series a cluster scrapes (the operator's ServiceMonitor strips the
    ``ray_`` prefix, so dashboards see the same names as ``/metrics``).

    A thread does the Ray calls that can wait, once a second: counters are summed in
    process and added then (a Ray metric call costs microseconds, and a stream adds to
    its token counter with every batch), and gauges are set again then, because Ray's
    agent drops a gauge series that was not set within two report intervals (an open
    WebSocket changes its gauge once, yet must stay visible). Histograms are recorded
    at once.
    """

    def __init__(self, refresh_s: float = 1.0) -> None:
        self._refresh_s = refresh_s
        self._gauges: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Any, float]] = {}
        # (id(metric), id(tags)) -> [metric, tags, sum]; the tags dict of a cached
        # series is the same object at every call.
        self._counts: dict[tuple[int, int], list[Any]] = {}
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> _Record:
        metric = serve_metrics.Counter(name, description=doc, tag_keys=_tag_keys(labels))
        counts, lock = self._counts, self._lock

        def record(value: float, tags: dict[str, str]) -> None:
            key = (id(metric), id(tags))
            with lock:
                entry = counts.get(key)
                if entry is None:
                    counts[key] = [metric, tags, value]
                else:
                    entry[2] += value

        self._start_refresher()
        return record

    def histogram(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> _Record:
        metric = serve_metrics.Histogram(
            name, description=doc, boundaries=list(buckets), tag_keys=_tag_keys(labels)
        )
        return lambda value, tags: metric.observe(value, tags)

    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> _Record:
        metric = serve_metrics.Gauge(name, description=doc, tag_keys=_tag_keys(labels))

        def record(value: float, tags: dict[str, str]) -> None:
            with self._lock:
                self._gauges[(id(metric), tuple(tags.items()))] = (metric, value)
            metric.set(value, tags)

        self._start_refresher()
        return record

    def _start_refresher(self) -> None:
        if self._refresher is None:
            self._refresher = threading.Thread(
                target=self._refresh_forever, name="chatfleet-metrics", daemon=True
            )
            self._refresher.start()

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(self._refresh_s)
            self.flush()

    def flush(self) -> None:
        """Add the summed counters to Ray's, and set every gauge again."""
        with self._lock:
            counts = list(self._counts.values())
            self._counts.clear()
            gauges = list(self._gauges.items())
        for metric, tags, total in counts:
            metric.inc(total, dict(tags))
        for (_, tags), (metric, value) in gauges:
            metric.set(value, dict(tags))
