"""Odd inputs for the metrics path, and the samples by which two exports are compared."""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from chatfleet.serving.api import Metrics

__all__ = ["RAY_MODELE", "Sample", "drive_odd_inputs", "moved_samples"]

Sample = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted own labels
RAY_MODELE = "mod\\xe8le"  # "modèle" as Ray carries it: printable ASCII only


def drive_odd_inputs(metrics: Metrics) -> None:
    """Good values mixed with every kind the metrics path must survive.

    Per call: a zero increment (no error), one negative increment, six invalid values
    (NaN, infinity, None, two observations and a gauge step), one short label set; and,
    the first time, two escaped label values ("modèle" in Ray, a lone surrogate here).
    """
    metrics.tokens.labels("m", "input").inc(0)  # a prompt of zero tokens: the old killer
    metrics.tokens.labels("m", "output").inc(64)
    metrics.tokens.labels("m", "output").inc(-3)
    metrics.tokens.labels("m", "output").inc(math.nan)
    metrics.tokens.labels("m", "output").inc(math.inf)
    metrics.tokens.labels("m", "output").inc(None)  # type: ignore[arg-type]
    metrics.tokens.labels("m", "input").inc(12)
    metrics.tokens.labels("modèle", "output").inc(5)  # Ray takes ASCII label values only
    metrics.tokens.labels(7, "output").inc(2)  # not a string: "7" in both
    metrics.errors.labels("bad\ud800code").inc()  # a lone surrogate: unrenderable as is
    metrics.requests.labels("/v1/x", "GET").inc()  # one label short
    metrics.time_to_first_token.labels("m").observe(0.2)
    metrics.time_to_first_token.labels("m").observe(math.nan)
    metrics.time_to_first_token.labels("m").observe(-math.inf)
    metrics.inter_token_latency.labels("m").observe(0.004)
    metrics.routing_duration.observe(0.01)
    streams = metrics.active_streams.labels("m")
    streams.inc()
    streams.inc()
    streams.dec()
    streams.inc(math.nan)
    metrics.websocket_connections.labels("chat").set(3)


def _sample_labels(metrics: Metrics) -> dict[str, tuple[str, ...]]:
    """Every sample name Ray can export for ``metrics``, with the labels it keeps."""
    names: dict[str, tuple[str, ...]] = {}
    for instrument in metrics.instruments:
        if instrument.kind == "histogram":
            names[f"{instrument.name}_bucket"] = (*instrument.labelnames, "le")
            # Not _sum: Ray's agent makes it up from bucket midpoints (Ray 2.60).
            names[f"{instrument.name}_count"] = instrument.labelnames
        else:
            names[instrument.name] = instrument.labelnames
    return names


def moved_samples(
    text: str,
    metrics: Metrics,
    *,
    prefix: str = "",
    only: dict[str, str] | None = None,
) -> dict[Sample, float]:
    """The samples of ``metrics``' series that moved, from an exposition ``text``.

    ``prefix`` is stripped from sample names (Ray's ``ray_``); samples whose labels
    do not include ``only`` are left out; labels that are not the instrument's own
    (Ray's node, worker and replica labels) are dropped. Series that never moved are
    left out: Ray cannot add zero to a counter, so it has none of them. A histogram's
    ``_sum`` is left out: Ray's agent exports one computed from bucket midpoints.
    """
    own = _sample_labels(metrics)
    found: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix(prefix)
            if not s.name.startswith(prefix) or name not in own:
                continue
            if only and any(s.labels.get(k) != v for k, v in only.items()):
                continue
            labels = {k: s.labels[k] for k in own[name]}
            if "le" in labels:
                labels["le"] = str(float(labels["le"]))  # "1" and "1.0", "+Inf" and "inf"
            found[(name, tuple(sorted(labels.items())))] = float(s.value)
    moved = {_series(key) for key, value in found.items() if value}
    return {key: value for key, value in found.items() if _series(key) in moved}


def _series(key: Sample) -> tuple[str, Iterable[tuple[str, str]]]:
    name, labels = key
    base = name.removesuffix("_bucket").removesuffix("_count")
    return base, tuple(kv for kv in labels if kv[0] != "le")
