"""The ingress metrics through real Ray: odd inputs leave Ray's series equal to /metrics.

A Serve deployment records into a `Metrics` exported by `RayMetricsMirror`, as the
ingress does, and is driven with every odd input the metrics path must survive (a zero
increment, which Ray's ``Counter.inc`` refuses, negative and NaN values, a label value
Ray cannot encode, a short label set), twice. Then what Ray's metrics agent exports on
the node's metrics port (``ray_chatfleet_*``, the series a cluster scrapes) must equal
what the replica's own registry renders, series by series.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from tests.fakes.odd_metrics import RAY_MODELE, drive_odd_inputs, moved_samples

from chatfleet.serving.api import Metrics

pytestmark = pytest.mark.ray

APP = "metrics-probe"
# Ray's agent exports every 10 s by default (RAY_metrics_report_interval_ms).
EXPORT_DEADLINE_S = 90.0


def probe_deployment() -> Any:
    from ray import serve

    from chatfleet.serving.app import RayMetricsMirror

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class MetricsProbe:
        def __init__(self) -> None:
            self.metrics = Metrics()
            self.mirror = RayMetricsMirror(self.metrics, interval_s=0.2)
            self.mirror.start()

        def drive(self) -> None:
            drive_odd_inputs(self.metrics)

        def render(self) -> str:
            return self.metrics.render().decode()

    return MetricsProbe


@pytest.fixture(scope="module")
def probe(ray_serve: Any) -> Any:
    from ray import serve

    handle = serve.run(probe_deployment().bind(), name=APP, route_prefix=None)
    try:
        yield handle
    finally:
        serve.delete(APP)


def ray_exposition() -> str:
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).text


def test_ray_series_equal_the_replica_registry_after_odd_inputs(probe: Any) -> None:
    for _ in range(2):
        probe.drive.remote().result(timeout_s=60)
    shape = Metrics()  # the instruments' names and labels
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        # Both sides settle: the mirror counts Ray's escapes while exporting.
        local = moved_samples(probe.render.remote().result(timeout_s=60), shape)
        expected = {
            (name, tuple((k, RAY_MODELE if v == "modèle" else v) for k, v in labels)): value
            for (name, labels), value in local.items()
        }
        exported = moved_samples(ray_exposition(), shape, prefix="ray_", only={"application": APP})
        if exported == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert local[("chatfleet_tokens_total", (("model", "m"), ("type", "output")))] == 128
    assert local[("chatfleet_metrics_errors_total", (("reason", "negative_increment"),))] == 2
    missing = {k: v for k, v in expected.items() if exported.get(k) != v}
    extra = {k: v for k, v in exported.items() if k not in expected}
    assert not missing and not extra, (
        f"Ray's series differ from the replica's /metrics:\n"
        f"  expected, Ray has otherwise: {[(k, v, exported.get(k)) for k, v in missing.items()]}\n"
        f"  only in Ray: {extra}"
    )
