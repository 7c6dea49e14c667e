"""The ingress metrics, exported through Ray's metrics system (`RayMetricsMirror`)."""

from __future__ import annotations

import threading
from typing import Any

from ray.serve import metrics as serve_metrics

from chatfleet.serving.api import Metrics
from chatfleet.serving.api._instruments import Counter, Gauge, Histogram, Instrument, escape_label

_SeriesKey = tuple[str, tuple[str, ...]]  # (metric name, label values)


def _ray_metric(instrument: Instrument) -> Any:
    # Ray annotates tag_keys as Tuple[str] where it means Tuple[str, ...].
    tag_keys: Any = instrument.labelnames
    if isinstance(instrument, Histogram):
        return serve_metrics.Histogram(
            instrument.name,
            description=instrument.doc,
            boundaries=list(instrument.buckets),
            tag_keys=tag_keys,
        )
    kind = serve_metrics.Counter if isinstance(instrument, Counter) else serve_metrics.Gauge
    return kind(instrument.name, description=instrument.doc, tag_keys=tag_keys)


def _inside_each_bucket(bounds: tuple[float, ...]) -> list[float]:
    """A value inside each bucket (the +Inf one last): the one observed for its counts.

    Ray's workers send its agent bucket counts only; the agent exports ``_sum`` from
    bucket midpoints (``ray/_private/telemetry/open_telemetry_metric_recorder.py``,
    Ray 2.60), so which value inside a bucket is observed changes nothing exported.
    A midpoint is inside whichever end a bucket includes.
    """
    lows = (0.0, *bounds[:-1])
    return [(low + high) / 2 for low, high in zip(lows, bounds, strict=True)] + [bounds[-1] * 2]


def _gains(before: tuple[float, ...], after: tuple[float, ...]) -> list[float]:
    """What each bucket gained, from two cumulative counts."""
    return [
        (a - (after[i - 1] if i else 0.0)) - (b - (before[i - 1] if i else 0.0))
        for i, (b, a) in enumerate(zip(before, after, strict=True))
    ]


class RayMetricsMirror:
    """Exports an ingress replica's `Metrics` through Ray's metrics system.

    Each node's metrics agent exports them on the node's metrics port (8080 in the
    cluster) as ``ray_<name>`` with the replica's ``deployment``/``replica`` labels: the
    per-replica series a cluster scrapes (the operator's ServiceMonitor strips the
    ``ray_`` prefix, so dashboards see the same names as ``/metrics``).

    Requests record into the registry only; a thread copies it into Ray once a
    second (`export`), so no Ray call is on the per-token path: counters add what they
    gained since the last pass (Ray's ``inc`` takes positive amounts only, so nothing
    is sent for a series that did not move), histograms observe a value inside each
    bucket once per observation the bucket gained, and every gauge is set again,
    because Ray's agent drops a gauge series that was not set within two report
    intervals (an open WebSocket changes its gauge once, yet must stay visible). A
    failure of any Ray call is counted in ``chatfleet_metrics_errors_total`` and never
    stops the thread. Label values Ray cannot carry (it takes printable ASCII only)
    are sent with backslash escapes.
    """

    def __init__(self, metrics: Metrics, interval_s: float = 1.0) -> None:
        self._metrics = metrics
        self._interval_s = interval_s
        self._exports: list[tuple[Instrument, Any]] = []
        for instrument in metrics.instruments:
            try:
                self._exports.append((instrument, _ray_metric(instrument)))
            except Exception as exc:  # the registry and the other metrics still work
                metrics.report_error("export_failed", instrument.name, exc)
        self._points = {
            i.name: _inside_each_bucket(i.buckets)
            for i in metrics.instruments
            if isinstance(i, Histogram)
        }
        self._exported: dict[_SeriesKey, float] = {}
        self._bucket_counts: dict[_SeriesKey, tuple[float, ...]] = {}
        self._tags: dict[_SeriesKey, dict[str, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one pass at a time: `stop` may race the thread

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._export_forever, name="chatfleet-metrics", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread, after a last pass."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.export()

    def _export_forever(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.export()

    def export(self) -> None:
        """Copy what was recorded since the last pass into Ray; never raises."""
        with self._lock:
            for instrument, metric in self._exports:
                try:
                    self._export(instrument, metric)
                except Exception as exc:
                    self._metrics.report_error("export_failed", instrument.name, exc)

    def _export(self, instrument: Instrument, metric: Any) -> None:
        name = instrument.name
        if isinstance(instrument, Histogram):
            points = self._points[name]
            for labelvalues, cumulative in instrument.values():
                key = (name, labelvalues)
                before = self._bucket_counts.get(key, (0.0,) * len(cumulative))
                if cumulative != before:
                    self._bucket_counts[key] = cumulative
                    values = [
                        point
                        for point, gained in zip(points, _gains(before, cumulative), strict=True)
                        for _ in range(int(gained))
                    ]
                    tags = self._tags_of(name, instrument.labelnames, labelvalues)
                    self._record(name, metric.observe, values, tags)
        elif isinstance(instrument, Counter):
            for labelvalues, total in instrument.values():
                key = (name, labelvalues)
                gained = total - self._exported.get(key, 0.0)
                if gained > 0:
                    # Recorded as sent even if Ray refuses it: a refusal is counted once.
                    self._exported[key] = total
                    tags = self._tags_of(name, instrument.labelnames, labelvalues)
                    self._record(name, metric.inc, [gained], tags)
        else:
            assert isinstance(instrument, Gauge)
            for labelvalues, level in instrument.values():
                tags = self._tags_of(name, instrument.labelnames, labelvalues)
                self._record(name, metric.set, [level], tags)

    def _record(self, name: str, call: Any, values: list[float], tags: dict[str, str]) -> None:
        try:
            for value in values:
                call(value, tags)
        except (ValueError, TypeError) as exc:  # Ray's checks of values and tags
            self._metrics.report_error("export_rejected", name, exc)
        except Exception as exc:
            self._metrics.report_error("export_failed", name, exc)

    def _tags_of(
        self, name: str, labelnames: tuple[str, ...], labelvalues: tuple[str, ...]
    ) -> dict[str, str]:
        key = (name, labelvalues)
        tags = self._tags.get(key)
        if tags is None:
            safe = tuple(
                v if v.isascii() and v.isprintable() else escape_label(v) for v in labelvalues
            )
            if safe != labelvalues:
                self._metrics.report_error("label_escaped", name, labelvalues)
            tags = self._tags[key] = dict(zip(labelnames, safe, strict=True))
        return tags
