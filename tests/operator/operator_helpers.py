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
