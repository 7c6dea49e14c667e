"""Pure builders: a ChatDeployment's spec in, Kubernetes manifests (dicts) out.

No I/O and no clock here: the handlers apply what these return (and add owner
references with `kopf.adopt`), the tests check them without a server.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import yaml

from chatfleet.operator._models import (
    GPU_RESOURCE,
    ChatDeploymentSpec,
    ComputeResources,
    Resources,
    Toleration,
)

# Names, labels and constants live in `_names`; re-exported here for the handlers.
from chatfleet.operator._names import (
    APPLICATION_NAME,
    DEFAULT_DATABASE_URL_ENV,
    IMPORT_PATH,
    JWT_SECRET_KEY,
    OLLAMA_PORT,
    RAY_METRICS_PORT,
    _meta,
    jwt_secret_name,
    labels_for,
    rayservice_name,
)
from chatfleet.operator._shutdown import (
    deployment_shutdown_options,
    prestop_hook,
    termination_grace_period_s,
)
from chatfleet.serving.config import AppConfig, ModelConfig

# --- RayService ------------------------------------------------------------------


def database_url_env(spec: ChatDeploymentSpec) -> str | None:
    """The variable holding the database URL in the pods, when a Secret provides one."""
    if spec.cluster.database_secret_ref is None:
        return None
    return spec.serving.store.url_env or DEFAULT_DATABASE_URL_ENV


def serving_args(spec: ChatDeploymentSpec) -> AppConfig:
    """The serving config handed to ``build_app``: ``spec.serving``, wired to the Secrets."""
    serving = spec.serving
    url_env = database_url_env(spec)
    if url_env is not None and serving.store.url_env != url_env:
        serving = serving.model_copy(
            update={"store": serving.store.model_copy(update={"url_env": url_env})}
        )
    return serving


def serve_config(spec: ChatDeploymentSpec) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2) as a dict: one application at route "/"."""
    serving = serving_args(spec)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": serving.server.port},
        "applications": [
            {
                "name": APPLICATION_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                # The args ARE the serving config: build_app validates them again.
                "args": serving.model_dump(mode="json", exclude_none=True),
                # Serve's per-request access log costs ~15% of a request's CPU
                # (bench/gateway.py); chatfleet's metrics and traces cover it.
                "logging_config": {"enable_access_log": False},
                "deployments": deployment_shutdown_options(serving),
            }
        ],
    }


def _is_local_ollama(model: ModelConfig) -> bool:
    if model.engine != "ollama" or model.ollama is None:
        return False
    return urlsplit(model.ollama.base_url).hostname in ("127.0.0.1", "localhost", "::1")


def ollama_models_by_group(spec: ChatDeploymentSpec) -> dict[str, list[str]]:
    """Which Ray groups get an Ollama sidecar, and which Ollama models each pulls.

    A model that asks for GPUs runs on the GPU group; one that does not may be
    scheduled on the head or any CPU worker, so those all get the sidecar.
    """
    groups: dict[str, list[str]] = {}
    for model in spec.serving.models:
        if not _is_local_ollama(model):
            continue
        assert model.ollama is not None
        targets = ["gpu"] if model.num_gpus > 0 else ["head", "cpu"]
        for group in targets:
            tags = groups.setdefault(group, [])
            if model.ollama.model not in tags:
                tags.append(model.ollama.model)
    return groups


def _quantities(res: ComputeResources) -> dict[str, str]:
    return {"cpu": res.cpu, "memory": res.memory}


def _container_resources(res: Resources, gpus: int = 0) -> dict[str, Any]:
    out = {"requests": _quantities(res.requests), "limits": _quantities(res.limits)}
    if gpus:
        out["requests"][GPU_RESOURCE] = str(gpus)
        out["limits"][GPU_RESOURCE] = str(gpus)
    return out


def _toleration(t: Toleration) -> dict[str, Any]:
    return t.model_dump(by_alias=True, exclude_none=True)


def _env(name: str, spec: ChatDeploymentSpec) -> list[dict[str, Any]]:
    jwt = spec.cluster.jwt_secret_ref
    env: list[dict[str, Any]] = [
        {
            "name": spec.serving.auth.signing_key_env,
            "valueFrom": {
                "secretKeyRef": {
                    "name": jwt.name if jwt else jwt_secret_name(name),
                    "key": jwt.key if jwt else JWT_SECRET_KEY,
                }
            },
        },
        # What `chatfleet serve` runs and bench/gateway.py measures: uvloop, handle
        # calls over gRPC, no per-request log lines.
        {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"},
        # Ray starts workers at niceness 15; here they are the Serve replicas and
        # HAProxy, the pod's workload, which Ray's own agents must not starve (as
        # `chatfleet serve` sets: chatfleet.serving._serve_env.SERVING_PRIORITY).
        {"name": "RAY_worker_niceness", "value": "0"},
        {
            "name": "RAY_SERVE_ENABLE_HA_PROXY",
            "value": "1" if spec.cluster.http_proxy == "haproxy" else "0",
        },
    ]
    db = spec.cluster.database_secret_ref
    url_env = database_url_env(spec)
    if db is not None and url_env is not None:
        env.append(
            {
                "name": url_env,
                "valueFrom": {"secretKeyRef": {"name": db.name, "key": db.key}},
            }
        )
    return env


def _ollama_sidecar(spec: ChatDeploymentSpec, tags: list[str], gpu: bool) -> dict[str, Any]:
    pulls = " && ".join(f"ollama pull {shlex.quote(tag)}" for tag in tags)
    script = (
        "ollama serve & pid=$!; "
        "until ollama list >/dev/null 2>&1; do sleep 1; done; "
        f"{pulls}; wait $pid"
    )
    env = [{"name": "OLLAMA_HOST", "value": f"127.0.0.1:{OLLAMA_PORT}"}]
    if gpu:
        # The device plugin hands the pod's GPUs to the Ray container; the NVIDIA
        # runtime exposes them to this container too through this variable.
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})
    container: dict[str, Any] = {
        "name": "ollama",
        "image": spec.cluster.ollama.image,
        "imagePullPolicy": spec.cluster.image_pull_policy,
        "command": ["/bin/sh", "-c", script],
        "env": env,
        "ports": [{"name": "ollama", "containerPort": OLLAMA_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/api/version", "port": OLLAMA_PORT},
            "periodSeconds": 10,
        },
        "volumeMounts": [{"name": "ollama-models", "mountPath": "/root/.ollama"}],
    }
    if spec.cluster.ollama.resources is not None:
        container["resources"] = {"requests": _quantities(spec.cluster.ollama.resources)}
    return container


def _pod_template(
    name: str,
    spec: ChatDeploymentSpec,
    *,
    container_name: str,
    resources: dict[str, Any],
    ports: list[dict[str, Any]],
    node_selector: Mapping[str, str],
    tolerations: list[Toleration],
    ollama_tags: list[str] | None,
    gpu: bool = False,
) -> dict[str, Any]:
    cluster = spec.cluster
    ray: dict[str, Any] = {
        "name": container_name,
        "image": cluster.image,
        "imagePullPolicy": cluster.image_pull_policy,
        "resources": resources,
        "env": _env(name, spec),
        "lifecycle": {"preStop": prestop_hook(spec.serving)},  # drain before Ray stops
    }
    if cluster.env_from_secrets:
        ray["envFrom"] = [{"secretRef": {"name": s}} for s in cluster.env_from_secrets]
    if ports:
        ray["ports"] = ports
    pod: dict[str, Any] = {
        "containers": [ray],
        "terminationGracePeriodSeconds": termination_grace_period_s(spec.serving),
    }
    if ollama_tags:
        pod["containers"].append(_ollama_sidecar(spec, ollama_tags, gpu))
        pod["volumes"] = [{"name": "ollama-models", "emptyDir": {}}]
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [_toleration(t) for t in tolerations]
    return {"metadata": {"labels": labels_for(name)}, "spec": pod}


def build_rayservice(name: str, namespace: str, spec: ChatDeploymentSpec) -> dict[str, Any]:
    """The KubeRay ``RayService`` (ray.io/v1) that runs the serving application."""
    cluster = spec.cluster
    ollama = ollama_models_by_group(spec)
    head_ports = [
        {"name": "gcs", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": spec.serving.server.port},
        {"name": "metrics", "containerPort": RAY_METRICS_PORT},
    ]
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0"},
        "template": _pod_template(
            name,
            spec,
            container_name="ray-head",
            resources=_container_resources(cluster.head.resources),
            ports=head_ports,
            node_selector=cluster.head.node_selector,
            tolerations=cluster.head.tolerations,
            ollama_tags=ollama.get("head"),
        ),
    }
    workers: list[dict[str, Any]] = []
    if cluster.cpu_workers is not None:
        group = cluster.cpu_workers
        workers.append(
            {
                "groupName": "cpu",
                "replicas": group.replicas,
                "minReplicas": group.min_replicas,
                "maxReplicas": group.max_replicas,
                "rayStartParams": {},
                "template": _pod_template(
                    name,
                    spec,
                    container_name="ray-worker",
                    resources=_container_resources(group.resources),
                    ports=[],
                    node_selector=group.node_selector,
                    tolerations=group.tolerations,
                    ollama_tags=ollama.get("cpu"),
                ),
            }
        )
    if cluster.gpu_workers is not None:
        gpu_group = cluster.gpu_workers
        workers.append(
            {
                "groupName": "gpu",
                "replicas": gpu_group.replicas,
                "minReplicas": gpu_group.min_replicas,
                "maxReplicas": gpu_group.max_replicas,
                "rayStartParams": {"num-gpus": str(gpu_group.gpus_per_pod)},
                "template": _pod_template(
                    name,
                    spec,
                    container_name="ray-worker",
                    resources=_container_resources(gpu_group.resources, gpu_group.gpus_per_pod),
                    ports=[],
                    node_selector=gpu_group.node_selector,
                    tolerations=gpu_group.tolerations,
                    ollama_tags=ollama.get("gpu"),
                    gpu=True,
                ),
            }
        )
    autoscale = bool(workers) and any(w["minReplicas"] != w["maxReplicas"] for w in workers)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(rayservice_name(name), namespace, name),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(spec), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": cluster.ray_version,
                "enableInTreeAutoscaling": autoscale,
                "headGroupSpec": head,
                "workerGroupSpecs": workers,
            },
        },
    }


# --- Secret, Service, ServiceMonitor -----------------------------------------------
