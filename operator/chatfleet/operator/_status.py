"""A ChatDeployment's status, computed from what KubeRay reports (pure functions).

KubeRay (ray.io/v1, 1.x) reports a RayService's health in ``status.conditions``
(``Ready``, ``UpgradeInProgress``), the older ``status.serviceStatus``
(``Running``) and per application in
``status.activeServiceStatus.applicationStatuses.<app>.status`` (``RUNNING``,
``DEPLOYING``, ``DEPLOY_FAILED``, ``UNHEALTHY``...). They map to ours as:

- ``Ready``: the RayService's ``Ready`` condition, else ``serviceStatus == Running``;
- ``Degraded``: an application is ``DEPLOY_FAILED`` or ``UNHEALTHY``;
- ``Progressing``: not ready and not degraded, or an upgrade is in progress, or
  KubeRay has not yet observed the RayService's latest generation;
- ``InvalidSpec``: set by the handler when the spec fails validation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from chatfleet.operator._names import APPLICATION_NAME

_FAILED_APP_STATES = {"DEPLOY_FAILED", "UNHEALTHY"}


def _condition(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def _make(
    type_: str, ok: bool, reason: str, message: str, generation: int | None
) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def conditions_from_rayservice(
    rayservice: Mapping[str, Any] | None, generation: int | None
) -> list[dict[str, Any]]:
    """Our Ready/Progressing/Degraded/InvalidSpec conditions (no timestamps yet)."""
    if rayservice is None:
        return [
            _make(
                "Ready",
                False,
                "RayServiceMissing",
                "The RayService does not exist yet.",
                generation,
            ),
            _make("Progressing", True, "Creating", "Creating the RayService.", generation),
            _make("Degraded", False, "AsExpected", "", generation),
            _make("InvalidSpec", False, "SpecValid", "", generation),
        ]
    status = rayservice.get("status") or {}
    rs_conditions = status.get("conditions") or []
    ready_cond = _condition(rs_conditions, "Ready")
    if ready_cond is not None:
        ready = ready_cond.get("status") == "True"
        ready_reason = str(ready_cond.get("reason") or ("Ready" if ready else "NotReady"))
        ready_message = str(ready_cond.get("message") or "")
    else:
        ready = status.get("serviceStatus") == "Running"
        ready_reason = "Running" if ready else "Pending"
        ready_message = f"RayService serviceStatus: {status.get('serviceStatus') or 'unknown'}"

    apps = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    failed = {
        name: app for name, app in apps.items() if (app or {}).get("status") in _FAILED_APP_STATES
    }
    if failed:
        degraded_message = "; ".join(
            f"application {name}: {app.get('status')}: {app.get('message') or ''}".strip()
            for name, app in sorted(failed.items())
        )
    else:
        degraded_message = ""

    upgrading_cond = _condition(rs_conditions, "UpgradeInProgress")
    upgrading = upgrading_cond is not None and upgrading_cond.get("status") == "True"
    rs_generation = (rayservice.get("metadata") or {}).get("generation")
    stale = rs_generation is not None and status.get("observedGeneration") != rs_generation
    progressing = upgrading or stale or (not ready and not failed)
    if upgrading:
        progressing_reason, progressing_message = "Upgrading", "KubeRay is upgrading the cluster."
    elif stale:
        progressing_reason, progressing_message = (
            "Reconciling",
            "KubeRay has not observed the change yet.",
        )
    elif progressing:
        app = apps.get(APPLICATION_NAME) or {}
        progressing_reason = "Deploying"
        progressing_message = f"Serve application: {app.get('status') or 'not deployed yet'}"
    else:
        progressing_reason, progressing_message = "Settled", ""
    return [
        _make("Ready", ready, ready_reason, ready_message, generation),
        _make("Progressing", progressing, progressing_reason, progressing_message, generation),
        _make(
            "Degraded",
            bool(failed),
            "ApplicationFailed" if failed else "AsExpected",
            degraded_message,
            generation,
        ),
        _make("InvalidSpec", False, "SpecValid", "", generation),
    ]


def invalid_spec_conditions(message: str, generation: int | None) -> list[dict[str, Any]]:
    """Conditions for a spec the operator refuses; the owned objects are left as they were."""
    return [
        _make("Ready", False, "InvalidSpec", "The spec is invalid; see InvalidSpec.", generation),
        _make("Progressing", False, "InvalidSpec", "", generation),
        _make("Degraded", False, "AsExpected", "", generation),
        _make("InvalidSpec", True, "ValidationFailed", message[:32768], generation),
    ]


def forbidden_conditions(message: str, generation: int | None) -> list[dict[str, Any]]:
    """Conditions while RBAC refuses the operator something it needs to reconcile."""
    return [
        _make("Ready", False, "Forbidden", message[:32768], generation),
        _make("Progressing", False, "Forbidden", "", generation),
        _make("Degraded", True, "Forbidden", message[:32768], generation),
        _make("InvalidSpec", False, "SpecValid", "", generation),
    ]


def stamp_transitions(
    new: list[dict[str, Any]], previous: Iterable[Mapping[str, Any]] | None, now: str
) -> list[dict[str, Any]]:
    """Add ``lastTransitionTime``: kept from ``previous`` while a condition's status holds."""
    old = {c.get("type"): c for c in previous or ()}
    out = []
    for cond in new:
        before = old.get(cond["type"])
        if (
            before is not None
            and before.get("status") == cond["status"]
            and before.get("lastTransitionTime")
        ):
            stamp = before["lastTransitionTime"]
        else:
            stamp = now
        out.append({**cond, "lastTransitionTime": stamp})
    return out


def conditions_equal(a: Iterable[Mapping[str, Any]], b: Iterable[Mapping[str, Any]]) -> bool:
    return [dict(c) for c in a] == [dict(c) for c in b]
