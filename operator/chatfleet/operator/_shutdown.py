"""What the RayService carries so that a pod or replica that stops loses no accepted
request silently (pure functions of the serving config, used by `_builders`).

- Every Ray pod: a preStop hook, ``chatfleet drain``, which drains the pod's ingress
  replicas as ``chatfleet serve`` does on SIGTERM (readiness 503 at once, new requests
  503 ``shutting_down``, streams may finish for ``server.drain_timeout_s``, the rest
  end with their terminal event), and a ``terminationGracePeriodSeconds`` covering
  that drain and Ray's own stop after it (Kubernetes' 30 s default would cut it).
- Serve: ``graceful_shutdown_timeout_s`` on the ingress and on each engine deployment,
  so a replica Serve itself replaces (a serve config update, a scale-down) keeps
  serving its requests for as long as a drain would.
"""

from __future__ import annotations

import math
from typing import Any

from chatfleet.serving.config import AppConfig

__all__ = ["deployment_shutdown_options", "prestop_hook", "termination_grace_period_s"]

#: After the preStop hook: SIGTERM reaches Ray, which stops its processes.
RAY_STOP_S = 5.0
#: How often a stopping replica checks whether its requests are done (Serve's default: 2 s).
WAIT_LOOP_S = 1.0


def termination_grace_period_s(serving: AppConfig) -> int:
    return math.ceil(serving.server.shutdown_grace_s + RAY_STOP_S)


def prestop_hook(serving: AppConfig) -> dict[str, Any]:
    """Drain this pod's ingress replicas; returns when they are drained (or at the bound)."""
    server = serving.server
    command = ["python", "-m", "chatfleet.serving.cli", "drain"]
    command += ["--port", str(server.port), "--timeout", f"{server.drain_timeout_s:g}"]
    return {"exec": {"command": command}}


def deployment_shutdown_options(serving: AppConfig) -> list[dict[str, Any]]:
    """serveConfigV2 ``deployments`` entries: the ingress's and each engine's shutdown."""
    names = ["ingress", *(f"engine-{model.name}" for model in serving.models)]
    return [
        {
            "name": name,
            "graceful_shutdown_timeout_s": serving.server.shutdown_grace_s,
            "graceful_shutdown_wait_loop_s": WAIT_LOOP_S,
        }
        for name in names
    ]
