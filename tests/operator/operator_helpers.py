"""Helpers shared by the operator tests (and bench/operator.py): paths, the emulator setup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kmock_emulator import StampingEmulator

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
CD_RESOURCE = "chatfleet.dev/v1alpha1/chatdeployments"
RS_RESOURCE = "ray.io/v1/rayservices"
SM_RESOURCE = "monitoring.coreos.com/v1/servicemonitors"


def ready_rayservice_status(generation: int) -> dict[str, Any]:
    """The ``status`` KubeRay writes on a RayService whose application is running."""
    return {
        "observedGeneration": generation,
        "serviceStatus": "Running",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "RayServiceReady",
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
        "activeServiceStatus": {"applicationStatuses": {"chatfleet": {"status": "RUNNING"}}},
    }


def load_sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text())


# Specs the CRD must reject, each with a phrase of the rejection: CEL rules say ours;
# schema violations are worded by jsonschema here (tests/cluster maps them to the API
# server's own words).
FAKE: dict[str, Any] = {"name": "fake", "engine": "fake"}
CLASSIFIER: dict[str, Any] = {"backend": "embedding"}
BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"serving": {"models": [{"name": "m", "engine": "llamacpp"}]}}, "is not one of"),
    ({"serving": {"models": [{**FAKE, "num_gpus": -1}]}}, "less than the minimum"),
    ({"cluster": {"gpuWorkers": {"gpusPerPod": -2}}}, "less than the minimum"),
    ({"serving": {"models": [{"name": "Bad Name", "engine": "fake"}]}}, "does not match"),
    ({"serving": {"models": []}}, "non-empty"),
    ({"cluster": {"jwtSecretRef": {"name": "s"}}}, "'key' is a required property"),
    ({"cluster": {"serviceType": "Ingress"}}, "is not one of"),
    (
        {
            "cluster": {
                "head": {
                    "resources": {
                        "requests": {"cpu": "lots", "memory": "1Gi"},
                        "limits": {"cpu": "1", "memory": "1Gi"},
                    }
                }
            }
        },
        "does not match",
    ),
    ({"serving": {"models": [{"name": "v", "engine": "vllm"}]}}, "need their settings block"),
    (
        {"serving": {"models": [{**FAKE, "ollama": {"model": "llama3.2"}}]}},
        "only the settings block of the model's own engine",
    ),
    (
        {
            "serving": {
                "models": [
                    {
                        "name": "o",
                        "engine": "openai",
                        "openai": {
                            "base_url": "https://x/v1",
                            "model": "m",
                            "api_key": "sk-123",
                        },
                    }
                ]
            }
        },
        "inline openai.api_key",
    ),
    ({"serving": {"models": [FAKE], "default_model": "nope"}}, "default_model must name"),
    ({"serving": {"store": {"url": "postgresql://u:pw@db/x"}}}, "inline store.url"),
    (
        {"serving": {"auth": {"clients": [{"client_id": "web"}]}}},
        "exactly one of secret_env or secret_sha256",
    ),
    (
        {
            "serving": {
                "models": [FAKE],
                "classifier": CLASSIFIER,
                "routing": {"routes": [{"category": "coding", "model": "gpt-9"}]},
            }
        },
        "every route must target a declared model",
    ),
    (
        {
            "serving": {
                "models": [FAKE],
                "classifier": CLASSIFIER,
                "routing": {
                    "routes": [{"category": "coding", "model": "fake", "fallbacks": ["gone"]}]
                },
            }
        },
        "every route fallback must be a declared model",
    ),
    (
        {
            "serving": {
                "models": [FAKE],
                "classifier": CLASSIFIER,
                "routing": {"routes": [{"category": "poetry", "model": "fake"}]},
            }
        },
        "every route must name a category",
    ),
    (
        {"serving": {"models": [FAKE], "routing": {"routes": []}}},
        "routing needs a classifier",
    ),
    (
        {"serving": {"models": [{**FAKE, "num_gpus": 1}]}},
        "need spec.cluster.gpuWorkers",
    ),
    (
        {"serving": {"models": [FAKE], "classifier": {**CLASSIFIER, "num_gpus": 0.5}}},
        "need spec.cluster.gpuWorkers",
    ),
    (
        {"cluster": {"cpuWorkers": {"replicas": 5, "maxReplicas": 2}}},
        "minReplicas <= replicas <= maxReplicas",
    ),
    (
        {
            "serving": {
                "models": [{**FAKE, "defaults": {"max_tokens": 500, "max_tokens_limit": 100}}]
            }
        },
        "max_tokens must not exceed",
    ),
    (
        {"cluster": {"head": {"tolerations": [{"operator": "Exists", "value": "x"}]}}},
        "value must be empty with Exists",
    ),
]


# --- Kopf against kmock ----------------------------------------------------------------


def declare_resources(emulator: StampingEmulator, *, service_monitors: bool = False) -> None:
    import kmock

    emulator.resources.load_bundled()
    emulator.resources[CD_RESOURCE] = kmock.ResourceInfo(
        kind="ChatDeployment",
        singular="chatdeployment",
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    )
    emulator.resources[RS_RESOURCE] = kmock.ResourceInfo(
        kind="RayService",
        singular="rayservice",
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    )
    if service_monitors:
        emulator.resources[SM_RESOURCE] = kmock.ResourceInfo(
            kind="ServiceMonitor",
            singular="servicemonitor",
            namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )


def write_kubeconfig(path: Path, url: str) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
                "current-context": "kmock",
            }
        )
    )


async def eventually(check: Callable[[], Any], within: float = 10.0, step: float = 0.05) -> Any:
    """Poll ``check`` on the event loop (kmock serves on it) until it returns truthy."""
    deadline = asyncio.get_running_loop().time() + within
    last_exc: Exception | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            result = check()
            if result:
                return result
        except (KeyError, AssertionError) as exc:
            last_exc = exc
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met in {within}s (last error: {last_exc!r})")
