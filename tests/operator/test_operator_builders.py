"""Pure builders: manifests from a spec, checked against KubeRay's and Kubernetes' schemas."""

from __future__ import annotations

import base64
import copy
import re
import sys
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from operator_helpers import load_sample

import chatfleet.operator
from chatfleet.operator import (
    ChatDeploymentSpec,
    build_jwt_secret,
    build_rayservice,
    build_service,
    build_service_monitor,
    parse_spec,
    serve_config,
)
from chatfleet.operator._builders import ollama_models_by_group
from chatfleet.serving.config import AppConfig, load_config

K8S_VERSION = kubernetes_validate.latest_version()


def strict(schema: Any) -> Any:
    """KubeRay's CRD schema, with unknown fields made errors instead of pruned."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator(rayservice_schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    assert rayservice_schema["group"] == "ray.io" and rayservice_schema["version"] == "v1"
    return jsonschema.Draft4Validator(strict(rayservice_schema["openAPIV3Schema"]))


def cpu_spec() -> ChatDeploymentSpec:
    return parse_spec(load_sample("chatfleet.dev_v1alpha1_chatdeployment.yaml")["spec"])


def gpu_spec() -> ChatDeploymentSpec:
    return parse_spec(load_sample("chatfleet.dev_v1alpha1_chatdeployment_gpu.yaml")["spec"])


def ollama_cpu_spec() -> ChatDeploymentSpec:
    return parse_spec(
        {
            "serving": {
                "models": [
                    {"name": "tiny", "engine": "ollama", "ollama": {"model": "qwen3:0.6b"}},
                    {
                        "name": "remote",
                        "engine": "ollama",
                        "ollama": {"model": "llama3.2", "base_url": "http://ollama.ai-tools:11434"},
                    },
                ]
            },
            "cluster": {"cpuWorkers": {"replicas": 2, "minReplicas": 1, "maxReplicas": 3}},
        }
    )


SPECS = {
    "default": ChatDeploymentSpec,
    "cpu-sample": cpu_spec,
    "gpu-sample": gpu_spec,
    "ollama-on-cpu": ollama_cpu_spec,
}


def containers(pod_template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_template["spec"]["containers"]}


def group(rs: dict[str, Any], name: str) -> dict[str, Any]:
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return next(g for g in groups if g["groupName"] == name)


@pytest.mark.parametrize("make", SPECS.values(), ids=SPECS.keys())
def test_every_rayservice_matches_kuberays_schema(
    make: Any, rayservice_validator: jsonschema.Draft4Validator
) -> None:
    rs = build_rayservice("demo", "ns", make())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in rayservice_validator.iter_errors(rs)
    ]
    assert errors == []


def test_schema_check_catches_a_wrong_field(
    rayservice_validator: jsonschema.Draft4Validator,
) -> None:
    rs = build_rayservice("demo", "ns", ChatDeploymentSpec())
    broken = copy.deepcopy(rs)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert list(rayservice_validator.iter_errors(broken))
    broken = copy.deepcopy(rs)
    broken["spec"]["serveConfigV2"] = {"applications": []}  # must be a YAML string
    assert list(rayservice_validator.iter_errors(broken))


@pytest.mark.parametrize("make", SPECS.values(), ids=SPECS.keys())
def test_serve_config_imports_build_app_with_the_serving_config(make: Any) -> None:
    spec = make()
    rs = build_rayservice("demo", "ns", spec)
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert config == serve_config(spec)
    (app,) = config["applications"]
    assert app["import_path"] == "chatfleet.serving.app:build_app"
    assert app["route_prefix"] == "/"
    assert config["http_options"] == {"host": "0.0.0.0", "port": spec.serving.server.port}
    # The args are the serving config, JSON-compatible and lossless.
    args = AppConfig.model_validate(app["args"])
    # build_app hands the args to load_config as overrides: same result.
    assert load_config(environ=False, overrides=app["args"]) == args
    if spec.cluster.database_secret_ref is None:
        assert args == spec.serving
    else:  # the operator points the store at the variable it fills from the Secret
        assert args.store.url_env == "CHATFLEET_DATABASE_URL"
        assert args.model_copy(update={"store": spec.serving.store}) == spec.serving


def test_default_runs_everything_on_the_head() -> None:
    rs = build_rayservice("demo", "ns", ChatDeploymentSpec())
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["workerGroupSpecs"] == []
    assert cluster["enableInTreeAutoscaling"] is False
    head = containers(cluster["headGroupSpec"]["template"])["ray-head"]
    assert head["image"] == ChatDeploymentSpec().cluster.image
    assert head["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == 8000 and ports["gcs"] == 6379
    assert rs["metadata"]["labels"]["chatfleet.dev/chatdeployment"] == "demo"


def test_gpu_group_gets_gpus_placement_and_ollama_sidecar() -> None:
    spec = gpu_spec()
    rs = build_rayservice("chat-gpu", "ml", spec)
    gpu = group(rs, "gpu")
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (1, 1, 2)
    assert gpu["rayStartParams"] == {"num-gpus": "1"}
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    by_name = containers(gpu["template"])
    worker = by_name["ray-worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["envFrom"] == [{"secretRef": {"name": "chatfleet-api-keys"}}]
    sidecar = by_name["ollama"]
    script = sidecar["command"][-1]
    assert "ollama serve" in script and "ollama pull llama3.2:3b" in script
    assert {"name": "OLLAMA_HOST", "value": "127.0.0.1:11434"} in sidecar["env"]
    assert pod["volumes"] == [{"name": "ollama-models", "emptyDir": {}}]
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    # The Ollama model asks for GPUs: only the GPU pods carry the sidecar.
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert set(containers(head)) == {"ray-head"}
    env = {e["name"]: e for e in worker["env"]}
    assert env["CHATFLEET_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "chatfleet-db",
        "key": "url",
    }
    assert env["CHATFLEET_JWT_SIGNING_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "chat-gpu-jwt",
        "key": "signing-key",
    }


def test_ollama_on_cpu_puts_the_sidecar_where_replicas_may_land() -> None:
    spec = ollama_cpu_spec()
    # Only the model served from localhost needs a sidecar; the remote one does not.
    assert ollama_models_by_group(spec) == {"head": ["qwen3:0.6b"], "cpu": ["qwen3:0.6b"]}
    rs = build_rayservice("demo", "ns", spec)
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert set(containers(head)) == {"ray-head", "ollama"}
    cpu = group(rs, "cpu")
    assert set(containers(cpu["template"])) == {"ray-worker", "ollama"}
    assert "NVIDIA_VISIBLE_DEVICES" not in str(containers(cpu["template"])["ollama"]["env"])


def test_cpu_sample_has_no_gpu_anything() -> None:
    rs = build_rayservice("chat-cpu", "default", cpu_spec())
    assert "nvidia.com/gpu" not in yaml.safe_dump(rs)
    assert "ollama" not in yaml.safe_dump(rs["spec"]["rayClusterConfig"])


def test_every_ray_pod_fronts_serve_with_haproxy_unless_asked_not_to() -> None:
    def env_of_all_ray_containers(spec: ChatDeploymentSpec) -> list[dict[str, str]]:
        cluster = build_rayservice("demo", "ns", spec)["spec"]["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]
        ]
        return [
            {e["name"]: e.get("value", "") for e in c["env"]}
            for t in templates
            for n, c in containers(t).items()
            if n.startswith("ray-")
        ]

    default = env_of_all_ray_containers(gpu_spec())
    assert len(default) >= 2  # the head and the GPU workers
    for env in default:
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert env["RAY_worker_niceness"] == "0"
    spec = gpu_spec()
    spec = spec.model_copy(
        update={"cluster": spec.cluster.model_copy(update={"http_proxy": "serve"})}
    )
    for env in env_of_all_ray_containers(spec):
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert parse_spec({"cluster": {"httpProxy": "serve"}}).cluster.http_proxy == "serve"


def test_user_jwt_secret_is_referenced_not_created() -> None:
    spec = parse_spec({"cluster": {"jwtSecretRef": {"name": "my-jwt", "key": "k"}}})
    rs = build_rayservice("demo", "ns", spec)
    head = containers(rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])["ray-head"]
    assert head["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "my-jwt", "key": "k"}


def test_secret_service_and_monitor_are_valid_kubernetes_objects() -> None:
    spec = gpu_spec()
    secret = build_jwt_secret("demo", "ns", "s3cr3t-key")
    assert base64.b64decode(secret["data"]["signing-key"]) == b"s3cr3t-key"
    service = build_service("demo", "ns", spec)
    for obj in (secret, service):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert service["spec"]["selector"] == {
        "chatfleet.dev/chatdeployment": "demo",
        "ray.io/serve": "true",
    }
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8000,
        "ray-metrics": 8080,
    }
    monitor = build_service_monitor("demo", "ns")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    # Only Ray's metrics port: the API port's /metrics is one random replica's.
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "ray-metrics"
    (rename,) = endpoint["metricRelabelings"]
    assert re.fullmatch(rename["regex"], "ray_chatfleet_tokens_total")
    assert not re.fullmatch(rename["regex"], "ray_serve_num_http_requests_total")


def test_builders_are_pure() -> None:
    spec = gpu_spec()
    assert build_rayservice("a", "b", spec) == build_rayservice("a", "b", spec)
    assert build_service("a", "b", spec) == build_service("a", "b", spec)


def test_public_surface_is_pinned() -> None:
    assert sorted(chatfleet.operator.__all__) == sorted(
        [
            "METRIC_RELABELINGS",
            "CPUWorkerGroup",
            "ChatDeploymentSpec",
            "ChatDeploymentStatus",
            "ClusterSpec",
            "Condition",
            "GPUWorkerGroup",
            "HeadGroup",
            "InvalidSpecError",
            "OperatorSettings",
            "Reconciler",
            "SecretKeyRef",
            "build_jwt_secret",
            "build_rayservice",
            "build_registry",
            "build_service",
            "build_service_monitor",
            "crd_schema",
            "parse_spec",
            "render_crd",
            "render_crd_yaml",
            "serve_config",
        ]
    )


def test_operator_never_imports_ray_or_torch() -> None:
    import subprocess

    code = (
        "import sys, chatfleet.operator, chatfleet.operator.cli, chatfleet.operator._operator;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('ray', 'torch', 'transformers', 'fastapi', 'vllm'));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("make", SPECS.values(), ids=SPECS.keys())
def test_serve_config_is_valid_for_ray_serve(make: Any) -> None:
    # Ray Serve's own schema of serveConfigV2 (Ray is a test-time dependency only:
    # the operator never imports it).
    schema = pytest.importorskip("ray.serve.schema")
    config = schema.ServeDeploySchema.model_validate(serve_config(make()))
    (app,) = config.applications
    assert app.route_prefix == "/"
    assert config.http_options.host == "0.0.0.0"


def test_application_name_matches_the_serving_app() -> None:
    # The operator reads the application's status by this name; it can't import
    # chatfleet.serving.app (Ray), so compare the source.
    from operator_helpers import ROOT

    from chatfleet.operator._names import APPLICATION_NAME

    source = (ROOT / "serving" / "chatfleet" / "serving" / "app" / "_build.py").read_text()
    assert f'APP_NAME = "{APPLICATION_NAME}"' in source
