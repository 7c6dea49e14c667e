"""Owned objects: their status mirrored into the ChatDeployment, their drift repaired.

Drift is repaired from watch events, not from a timer (Kopf timers need a finalizer):
an owned RayService or Service that someone edits or deletes is re-applied at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from chatfleet.operator import _builders as b
from chatfleet.operator._kube import Kube, KubeError
from chatfleet.operator._metrics import OperatorMetrics
from chatfleet.operator._models import API_VERSION, KIND, ChatDeploymentSpec
from chatfleet.operator._names import OWNER_LABEL
from chatfleet.operator._objects import build_service
from chatfleet.operator._spec import InvalidSpecError, now, parse_spec, ready_status
from chatfleet.operator._status import conditions_from_rayservice, stamp_transitions


class OwnedObjects:
    """The `Reconciler`'s handlers of owned RayService and Service events."""

    metrics: OperatorMetrics

    async def kube(self) -> Kube:
        raise NotImplementedError

    async def on_owned_event(
        self, *, body: kopf.Body, namespace: str | None, type: str, logger: Any, **_: Any
    ) -> None:
        """An owned RayService or Service changed: mirror its status, repair any drift."""
        owner = ((body.get("metadata") or {}).get("labels") or {}).get(OWNER_LABEL)
        if not owner or not namespace:
            return
        cd = await self._current(namespace, owner)
        if cd is None:
            return
        if body.get("kind") == "RayService" and type != "DELETED":
            cd = await self._mirror_status(cd, body, logger)
            if cd is None:
                return
        await self._repair(cd, body, type, logger)

    async def _current(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ChatDeployment, unless it is going away or its spec is invalid."""
        cd = await (await self.kube()).get(API_VERSION, KIND, namespace, name)
        if cd is None or (cd.get("metadata") or {}).get("deletionTimestamp"):
            return None  # the garbage collector is on it
        if any(
            c.get("type") == "InvalidSpec" and c.get("status") == "True"
            for c in (cd.get("status") or {}).get("conditions") or []
        ):
            return None  # the spec's problem is the news; the old objects are left alone
        return cd

    async def _mirror_status(
        self, cd: dict[str, Any], rayservice: kopf.Body, logger: Any
    ) -> dict[str, Any] | None:
        """Mirror a RayService's status into its ChatDeployment's conditions.

        The patch is conditional on the version read (a reconcile may be writing the
        same conditions): on a conflict the ChatDeployment is read again and the
        mirror recomputed from it. Returns the ChatDeployment as last read (``None``:
        it went away or became invalid meanwhile).
        """
        meta = cd.get("metadata") or {}
        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
        kube = await self.kube()
        for _attempt in range(3):
            status = cd.get("status") or {}
            generation = status.get("observedGeneration")
            new = stamp_transitions(
                conditions_from_rayservice(rayservice, generation), status.get("conditions"), now()
            )
            update: dict[str, Any] = {}
            if new != status.get("conditions"):
                update["conditions"] = new
            service_status = (rayservice.get("status") or {}).get("serviceStatus")
            if service_status and service_status != status.get("serviceStatus"):
                update["serviceStatus"] = service_status
            if not update:
                break
            version = (cd.get("metadata") or {}).get("resourceVersion")
            try:
                await kube.patch_status(
                    API_VERSION, KIND, namespace, name, update, resource_version=version
                )
            except KubeError as exc:
                if exc.status != 409:
                    raise
                again = await self._current(namespace, name)
                if again is None:
                    return None
                cd = again
                continue
            self.metrics.status_updates.inc()
            logger.debug("Mirrored RayService status into %s/%s", namespace, name)
            break
        self.metrics.track_ready(namespace, name, ready_status(new))
        return cd

    async def _repair(
        self, cd: Mapping[str, Any], actual: kopf.Body, type: str, logger: Any
    ) -> None:
        """Re-apply the owned object ``actual`` if it was deleted or no longer what we render."""
        meta = cd.get("metadata") or {}
        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
        try:
            spec = parse_spec(cd.get("spec"))
        except InvalidSpecError:
            return  # the next reconcile reports it
        # Only the watched kinds, built directly: `_render` would also ask the API server
        # whether ServiceMonitors exist, on every status update KubeRay writes.
        build = _WATCHED_BUILDERS.get(str(actual.get("kind")))
        if build is None:
            return
        wanted = build(name, namespace, spec)
        if wanted["metadata"]["name"] != (actual.get("metadata") or {}).get("name"):
            return  # e.g. a Service KubeRay made, labelled like ours
        kopf.adopt(wanted, owner=cd)  # type: ignore[arg-type]
        drifted = type == "DELETED" or not all(
            contains(actual.get(part), wanted.get(part)) for part in ("metadata", "spec")
        )
        if not drifted:
            return
        started = time.perf_counter()
        result = "applied"
        try:
            await (await self.kube()).apply(wanted)
            logger.info("Repaired %s %s (%s)", wanted["kind"], wanted["metadata"]["name"], type)
        except KubeError as exc:
            result = "error"
            self.metrics.errors.labels("api").inc()
            logger.warning("Could not repair %s: %s", wanted["metadata"]["name"], exc)
        finally:
            self.metrics.reconciles.labels("drift", result).inc()
            self.metrics.duration.labels("drift").observe(time.perf_counter() - started)


# The owned kinds the operator watches for drift, and how each is built.
_WATCHED_BUILDERS: dict[str, Callable[[str, str, ChatDeploymentSpec], dict[str, Any]]] = {
    "RayService": b.build_rayservice,
    "Service": build_service,
}


def contains(actual: Any, wanted: Any) -> bool:
    """Whether ``actual`` has every field ``wanted`` sets, with the same value.

    What the API server or a controller adds (defaults, ``clusterIP``, annotations of
    others) is not drift; a field of ours that changed or vanished is.
    """
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            contains(actual.get(key), value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(contains(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    return bool(actual == wanted)
