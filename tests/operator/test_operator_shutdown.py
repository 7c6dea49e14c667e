"""The RayService's shutdown settings match the serving drain (operator._shutdown)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from operator_helpers import ROOT, load_sample

from chatfleet.operator import ChatDeploymentSpec, build_rayservice, parse_spec, serve_config


def spec(**server: Any) -> ChatDeploymentSpec:
    sample = load_sample("chatfleet.dev_v1alpha1_chatdeployment_gpu.yaml")["spec"]
    sample.setdefault("serving", {})["server"] = server
    return parse_spec(sample)


def pods(rs: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_every_ray_pod_drains_before_ray_stops_and_is_given_the_time() -> None:
    rs = build_rayservice("demo", "ns", spec(drain_timeout_s=45, port=8100))
    assert len(pods(rs)) >= 2  # the head and the GPU workers
    for pod in pods(rs):
        # The drain (45 s), the interrupted streams' terminal events, Ray's stop.
        assert pod["terminationGracePeriodSeconds"] == 60
        ray = pod["containers"][0]
        command = ray["lifecycle"]["preStop"]["exec"]["command"]
        assert command[-5:] == ["drain", "--port", "8100", "--timeout", "45"]
        assert command[:3] == ["python", "-m", "chatfleet.serving.cli"]


def test_the_default_drain_fits_kubernetes_default_grace_and_the_pod_waits_for_it() -> None:
    default = ChatDeploymentSpec()
    assert default.serving.server.drain_timeout_s < 30  # Kubernetes' default grace period
    (pod,) = pods(build_rayservice("demo", "ns", default))
    assert pod["terminationGracePeriodSeconds"] > default.serving.server.drain_timeout_s


@pytest.mark.parametrize("drain", [5.0, 20.0, 90.0])
def test_serve_keeps_stopping_replicas_as_long_as_a_drain(drain: float) -> None:
    s = spec(drain_timeout_s=drain)
    (app,) = serve_config(s)["applications"]
    options = {d["name"]: d for d in app["deployments"]}
    engines = {f"engine-{m.name}" for m in s.serving.models}
    assert set(options) == {"ingress", *engines}
    for d in options.values():
        assert d["graceful_shutdown_timeout_s"] == drain + 10
        assert d["graceful_shutdown_wait_loop_s"] == 1.0
    rs = build_rayservice("demo", "ns", s)
    assert yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["deployments"] == list(
        options.values()
    )


def test_deployment_names_are_the_ones_build_app_binds() -> None:
    # The operator can't import chatfleet.serving.app (Ray): compare the source.
    source = (ROOT / "serving" / "chatfleet" / "serving" / "app" / "_build.py").read_text()
    assert 'name="ingress"' in source
    assert '"name": f"engine-{model.name}"' in source
