"""Instruments that never raise into a request and never stop recording.

A `Counter`, `Gauge` or `Histogram` records into a prometheus_client registry, where
an exporter reads it back (``values()``). What an instrument or an exporter cannot
take is dropped (or escaped), counted in ``chatfleet_metrics_errors_total{reason}``
and logged once per reason and metric (`MetricErrors`):

- ``invalid_value``: a value that is not a finite number (NaN, infinity, ``None``).
- ``negative_increment``: a counter increment below zero. Zero is no event and no error
  (a prompt of zero tokens adds nothing).
- ``bad_labels``: the wrong number of label values.
- ``label_escaped``: a label value a backend cannot carry as is, exported with
  backslash escapes instead (once per series): lone surrogates in the registry,
  anything but printable ASCII in Ray.
- ``export_rejected``: an exporter's backend refused a value or a series.
- ``export_failed``: any other exception in an exporter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

_INF = math.inf

Reason = Literal[
    "invalid_value",
    "negative_increment",
    "bad_labels",
    "label_escaped",
    "export_rejected",
    "export_failed",
]
"""Why the metrics path dropped or escaped something (see the module docstring)."""

LabelValues = tuple[str, ...]


def escape_label(value: str) -> str:
    """``value`` with backslash escapes for everything but printable ASCII."""
    return value.encode("unicode_escape").decode("ascii")


class MetricErrors:
    """Counts what the metrics path dropped, and logs each reason once per metric."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.prom = prometheus_client.Counter(
            "chatfleet_metrics_errors_total",
            "Values, label sets and exports the metrics path dropped or escaped, by reason.",
            ["reason"],
            registry=registry,
        )
        self._logged: set[tuple[str, str]] = set()

    def report(self, reason: Reason, metric: str, detail: object) -> None:
        self.prom.labels(reason).inc()
        if (reason, metric) not in self._logged:
            self._logged.add((reason, metric))
            logger.warning(
                "metrics: %s on %s (%r); counted in chatfleet_metrics_errors_total,"
                " not logged again",
                reason,
                metric,
                detail,
            )


class _Series:
    """One labelled series: checks a value before its prometheus_client child records it."""

    __slots__ = ("_errors", "_name", "_prom")

    def __init__(self, prom: Any, name: str, errors: MetricErrors) -> None:
        self._prom = prom
        self._name = name
        self._errors = errors


class CounterSeries(_Series):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        try:
            if 0 < amount < _INF:  # first: this is on the per-token path
                self._prom.inc(amount)
                return
            if amount == 0:
                return
            reason: Reason = "negative_increment" if amount < 0 else "invalid_value"
        except TypeError:
            reason = "invalid_value"
        self._errors.report(reason, self._name, amount)


class GaugeSeries(_Series):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if self._valid(amount):
            self._prom.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        if self._valid(amount):
            self._prom.dec(amount)

    def set(self, value: float) -> None:
        if self._valid(value):
            self._prom.set(value)

    def _valid(self, value: float) -> bool:
        try:
            if math.isfinite(value):
                return True
        except TypeError:
            pass
        self._errors.report("invalid_value", self._name, value)
        return False


class HistogramSeries(_Series):
    __slots__ = ()

    def observe(self, value: float) -> None:
        try:
            if -_INF < value < _INF:
                self._prom.observe(value)
                return
        except TypeError:
            pass
        self._errors.report("invalid_value", self._name, value)


class _Discarded:
    """Stands for a series whose labels were wrong: records nothing."""

    def inc(self, amount: float = 1.0) -> None:
        pass

    def dec(self, amount: float = 1.0) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


S = TypeVar("S", CounterSeries, GaugeSeries, HistogramSeries)


class _Instrument(Generic[S]):
    """A metric and its series; ``labels()`` children are cached (hot paths)."""

    kind: ClassVar[str]
    _series: type[S]

    def __init__(
        self, prom: Any, name: str, doc: str, labelnames: Sequence[str], errors: MetricErrors
    ) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self._prom = prom  # a prometheus_client Counter, Gauge or Histogram
        self._errors = errors
        self._children: dict[tuple[object, ...], S] = {}

    def labels(self, *values: object) -> S:
        child = self._children.get(values)
        if child is None:
            child = self._new_child(values)
        return child

    def _new_child(self, values: tuple[object, ...]) -> S:
        if len(values) != len(self.labelnames):
            self._errors.report("bad_labels", self.name, values)
            return _Discarded()  # type: ignore[return-value]  # the same methods, no-ops
        texts = tuple(str(v) for v in values)
        safe = tuple(t if t.isascii() else _utf8(t) for t in texts)
        if safe != texts:
            # prometheus_client would fail to render the whole registry.
            self._errors.report("label_escaped", self.name, texts)
        prom = self._prom.labels(*safe) if self.labelnames else self._prom
        child = self._children[values] = self._series(prom, self.name, self._errors)
        return child


def _current(
    prom: Any, sample: str, labelnames: LabelValues
) -> Iterator[tuple[LabelValues, float]]:
    for family in prom.collect():
        for s in family.samples:
            if s.name == sample:
                yield tuple(s.labels[n] for n in labelnames), s.value


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return escape_label(text)
    return text


class Counter(_Instrument[CounterSeries]):
    kind = "counter"
    _series = CounterSeries

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def values(self) -> Iterator[tuple[LabelValues, float]]:
        """Each series' total so far."""
        # prometheus_client adds "_total" to a counter's sample whether named with it or not.
        return _current(self._prom, self.name.removesuffix("_total") + "_total", self.labelnames)


class Gauge(_Instrument[GaugeSeries]):
    kind = "gauge"
    _series = GaugeSeries

    def values(self) -> Iterator[tuple[LabelValues, float]]:
        """Each series' current level."""
        return _current(self._prom, self.name, self.labelnames)


class Histogram(_Instrument[HistogramSeries]):
    kind = "histogram"
    _series = HistogramSeries

    def __init__(
        self,
        prom: Any,
        name: str,
        doc: str,
        labelnames: Sequence[str],
        errors: MetricErrors,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(prom, name, doc, labelnames, errors)
        self.buckets = tuple(buckets)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def values(self) -> Iterator[tuple[LabelValues, tuple[float, ...]]]:
        """Each series' cumulative bucket counts, in `buckets` order, +Inf last."""
        counts: dict[LabelValues, list[float]] = {}
        for labelvalues, count in _current(self._prom, f"{self.name}_bucket", self.labelnames):
            counts.setdefault(labelvalues, []).append(count)  # prometheus_client's order
        return ((labelvalues, tuple(c)) for labelvalues, c in counts.items())


Instrument = Counter | Gauge | Histogram
