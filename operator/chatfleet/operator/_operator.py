"""Kopf handlers: parse the spec, call the builders, apply, patch the status.

Everything is registered on an `kopf.OperatorRegistry` built by `build_registry`
(no import-time registration, no module state): the CLI passes it to
``kopf.run``, the tests to `kopf.testing.KopfRunner`.

Error classes at this boundary:

- the spec does not validate → ``InvalidSpec`` condition + Warning Event,
  `kopf.PermanentError` (no retries until the spec changes);
- a referenced Secret (or its key) is missing → ``InvalidSpec`` + Event,
  `kopf.TemporaryError` (re-checked every ``missing_secret_retry_s``);
- the operator's ServiceAccount lacks a permission (HTTP 403) → ``Ready=False``
  with reason ``Forbidden`` naming what RBAC refused + Warning Event,
  `kopf.TemporaryError` (retried: a fixed Role heals it);
- an API conflict, throttling or server error → `kopf.TemporaryError` with a
  short delay; anything else → Kopf's own retry with backoff.

Everything the operator creates carries an owner reference to its ChatDeployment,
so deleting one is the garbage collector's job: no finalizer holds a
ChatDeployment, and one deleted while the operator is down (or uninstalled) goes
away all the same. Owned objects' events (status, drift) are handled in `_drift`;
the spec and its errors are in `_spec`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf
from prometheus_client import start_http_server

from chatfleet.operator import _builders as b
from chatfleet.operator._drift import OwnedObjects
from chatfleet.operator._kube import Kube, KubeError, load_api_client
from chatfleet.operator._metrics import OperatorMetrics
from chatfleet.operator._models import (
    GROUP,
    MAX_NAME_LENGTH,
    PLURAL,
    VERSION,
    ChatDeploymentSpec,
)
from chatfleet.operator._names import OWNER_LABEL, endpoint_for, jwt_secret_name, rayservice_name
from chatfleet.operator._objects import build_jwt_secret, build_service, build_service_monitor
from chatfleet.operator._settings import OperatorSettings
from chatfleet.operator._spec import (
    InvalidSpecError,
    MissingSecretError,
    now,
    parse_spec,
    ready_status,
)
from chatfleet.operator._status import (
    conditions_from_rayservice,
    forbidden_conditions,
    invalid_spec_conditions,
    stamp_transitions,
)
from chatfleet.serving import telemetry

__all__ = ["FINALIZER", "InvalidSpecError", "Reconciler", "build_registry", "parse_spec"]

# Earlier versions put this finalizer on every ChatDeployment. Kopf still knows it as
# its own, so it removes it from such objects now that no handler needs it.
FINALIZER = f"{GROUP}/finalizer"


class Reconciler(OwnedObjects):
    """The operator's behaviour, bound to one API client, settings and metrics."""

    def __init__(
        self,
        settings: OperatorSettings,
        metrics: OperatorMetrics | None = None,
        kube_factory: Callable[[], Awaitable[Kube]] | None = None,
        tracer_provider: telemetry.TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or OperatorMetrics()
        if tracer_provider is None:
            tracer_provider = telemetry.configure_tracing(
                settings.telemetry(), component="operator"
            )
        self.tracer = telemetry.get_tracer(tracer_provider)
        self._kube_factory = kube_factory or self._connect
        self._kube: Kube | None = None
        self._metrics_server: Any = None

    async def _connect(self) -> Kube:
        client = await load_api_client(self.settings.kubeconfig)
        return Kube(client, self.settings.api_timeout_s)

    async def kube(self) -> Kube:
        """The API client, made on first use on Kopf's event loop (it holds a session)."""
        if self._kube is None:
            self._kube = await self._kube_factory()
        return self._kube

    # --- lifecycle ---------------------------------------------------------------

    async def startup(self, settings: kopf.OperatorSettings, logger: Any, **_: Any) -> None:
        prefix = GROUP
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=prefix, key="last-handled-configuration"
        )
        settings.posting.enabled = self.settings.post_events
        settings.posting.level = 20  # INFO and up become Events
        settings.execution.max_workers = 8
        settings.networking.error_backoffs = [1, 2, 5, 10, 30]
        # Re-open watches now and then: a silently dead connection would stall us.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        if self.settings.metrics_enabled and self._metrics_server is None:
            server, _thread = start_http_server(
                self.settings.metrics_port,
                addr=self.settings.metrics_host,
                registry=self.metrics.registry,
            )
            self._metrics_server = server
            logger.info("Serving metrics on %s:%s", *server.server_address[:2])
        await self.kube()  # fail at start-up, not on the first object

    async def cleanup(self, **_: Any) -> None:
        kube, self._kube = self._kube, None
        if kube is not None:
            await kube.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port (useful with ``metrics_port=0``)."""
        if self._metrics_server is None:
            return None
        return int(self._metrics_server.server_address[1])

    # --- reconcile -----------------------------------------------------------------

    async def _read_secret(self, namespace: str, name: str, logger: Any) -> dict[str, Any] | None:
        """A referenced Secret; ``{}`` (unchecked) when RBAC does not let us read Secrets."""
        try:
            return await (await self.kube()).get("v1", "Secret", namespace, name)
        except KubeError as exc:
            if exc.status != 403:
                raise
            # The chart grants no Secret reads unless rbac.readSecrets is set: then a
            # missing Secret shows in the Ray pods' status instead of here.
            logger.debug("Not checking Secret %s/%s: %s", namespace, name, exc)
            return {}

    async def _check_secrets(self, spec: ChatDeploymentSpec, namespace: str, logger: Any) -> None:
        refs = [
            ("spec.cluster.jwtSecretRef", spec.cluster.jwt_secret_ref),
            ("spec.cluster.databaseSecretRef", spec.cluster.database_secret_ref),
        ]
        for field, ref in refs:
            if ref is None:
                continue
            secret = await self._read_secret(namespace, ref.name, logger)
            if secret is None:
                raise MissingSecretError(f"{field}: Secret {ref.name!r} not found in {namespace}")
            keys = (secret.get("data") or {}) | (secret.get("stringData") or {})
            if secret and ref.key not in keys:
                raise MissingSecretError(f"{field}: Secret {ref.name!r} has no key {ref.key!r}")
        for i, secret_name in enumerate(spec.cluster.env_from_secrets):
            if await self._read_secret(namespace, secret_name, logger) is None:
                raise MissingSecretError(
                    f"spec.cluster.envFromSecrets[{i}]: Secret {secret_name!r} not found"
                )

    async def _ensure_jwt_secret(
        self, name: str, namespace: str, body: kopf.Body, logger: Any
    ) -> None:
        # Created once with a fresh key, then left alone: rotating it would log every
        # user out, so that is a human's decision (delete the Secret). Create-or-409
        # needs no right to read Secrets.
        secret = build_jwt_secret(name, namespace, secrets.token_urlsafe(48))
        kopf.adopt(secret, owner=body)
        if await (await self.kube()).create(secret) is not None:
            logger.info("Created the JWT signing key Secret %s", jwt_secret_name(name))

    async def _render(
        self, name: str, namespace: str, spec: ChatDeploymentSpec, owner: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """The owned objects, adopted by ``owner`` (the ChatDeployment)."""
        objects = [
            b.build_rayservice(name, namespace, spec),
            build_service(name, namespace, spec),
        ]
        if spec.cluster.service_monitor and await (await self.kube()).serves(
            "monitoring.coreos.com/v1", "servicemonitors"
        ):
            objects.append(build_service_monitor(name, namespace))
        for obj in objects:
            kopf.adopt(obj, owner=owner)  # type: ignore[arg-type]
        return objects

    def _invalid(
        self,
        exc: InvalidSpecError,
        body: kopf.Body,
        patch: kopf.Patch,
        generation: int | None,
        logger: Any,
    ) -> None:
        kind = "missing_secret" if isinstance(exc, MissingSecretError) else "invalid_spec"
        self.metrics.errors.labels(kind).inc()
        previous = (body.get("status") or {}).get("conditions")
        conditions = stamp_transitions(
            invalid_spec_conditions(str(exc), generation), previous, now()
        )
        patch.status["conditions"] = conditions
        patch.status["observedGeneration"] = generation
        if self.settings.post_events:
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
        logger.warning("Invalid spec: %s", exc)

    def _forbidden(
        self,
        exc: KubeError,
        body: kopf.Body,
        patch: kopf.Patch,
        generation: int | None,
        logger: Any,
    ) -> None:
        message = (
            f"RBAC refused the operator: {exc.message}. Grant it (helm upgrade the chatfleet"
            " chart, or fix its ClusterRole/Role); the operator retries on its own."
        )
        previous = (body.get("status") or {}).get("conditions")
        patch.status["conditions"] = stamp_transitions(
            forbidden_conditions(message, generation), previous, now()
        )
        if self.settings.post_events:
            kopf.warn(body, reason="Forbidden", message=message)
        logger.error("%s", message)

    async def reconcile(
        self,
        *,
        body: kopf.Body,
        name: str,
        namespace: str,
        patch: kopf.Patch,
        logger: Any,
        trigger: str,
    ) -> None:
        """Render, apply and report one ChatDeployment (create/update/resume)."""
        started = time.perf_counter()
        meta = body.get("metadata") or {}
        generation = meta.get("generation")
        result = "error"
        try:
            try:
                if len(name) > MAX_NAME_LENGTH:
                    raise InvalidSpecError(
                        f"metadata.name: at most {MAX_NAME_LENGTH} characters (KubeRay derives"
                        " longer names from it)"
                    )
                spec = parse_spec(body.get("spec"))
                await self._check_secrets(spec, namespace, logger)
            except InvalidSpecError as exc:
                result = "invalid"
                self._invalid(exc, body, patch, generation, logger)
                if isinstance(exc, MissingSecretError):
                    raise kopf.TemporaryError(
                        str(exc), delay=self.settings.missing_secret_retry_s
                    ) from None
                raise kopf.PermanentError(str(exc)) from None
            try:
                if spec.cluster.jwt_secret_ref is None:
                    await self._ensure_jwt_secret(name, namespace, body, logger)
                applied: dict[str, Any] | None = None
                kube = await self.kube()
                for obj in await self._render(name, namespace, spec, body):
                    out = await kube.apply(obj)
                    if obj["kind"] == "RayService":
                        applied = out
            except KubeError as exc:
                self.metrics.errors.labels("api").inc()
                if exc.status == 403 and "RESTMapping" in exc.message:
                    # Admission checks owner references against the API server's view
                    # of the kinds, which learns a just-installed CRD a moment later.
                    raise kopf.TemporaryError(str(exc), delay=2) from exc
                if exc.status == 403:
                    result = "forbidden"
                    self._forbidden(exc, body, patch, generation, logger)
                    raise kopf.TemporaryError(
                        str(exc), delay=self.settings.forbidden_retry_s
                    ) from exc
                if exc.status == 404:
                    # Applying creates; a 404 means the kind itself is not served.
                    raise kopf.TemporaryError(
                        f"{exc} (is KubeRay installed? the operator needs ray.io/v1 RayService)",
                        delay=60,
                    ) from exc
                delay = 2 if exc.status in (409, 429) or exc.status >= 500 else 30
                raise kopf.TemporaryError(str(exc), delay=delay) from exc
            status = body.get("status") or {}
            conditions = stamp_transitions(
                conditions_from_rayservice(applied, generation), status.get("conditions"), now()
            )
            patch.status["observedGeneration"] = generation
            patch.status["conditions"] = conditions
            patch.status["endpoint"] = endpoint_for(name, namespace, spec)
            patch.status["models"] = ",".join(m.name for m in spec.serving.models)
            patch.status["rayService"] = rayservice_name(name)
            rs_status = (applied or {}).get("status") or {}
            if rs_status.get("serviceStatus"):
                patch.status["serviceStatus"] = rs_status["serviceStatus"]
            result = "applied"
        finally:
            if not meta.get("deletionTimestamp"):  # else the delete handler forgets it
                # What this reconcile writes, else what the object already says.
                written = patch.status.get("conditions")
                current = (body.get("status") or {}).get("conditions")
                self.metrics.track_ready(namespace, name, ready_status(written or current))
            self.metrics.reconciles.labels(trigger, result).inc()
            self.metrics.duration.labels(trigger).observe(time.perf_counter() - started)

    def on_chatdeployment_event(
        self, *, namespace: str | None, name: str | None, type: str, **_: Any
    ) -> None:
        """A deleted ChatDeployment: forget its metrics (its objects are garbage-collected)."""
        if type == "DELETED" and namespace and name:
            self.metrics.forget(namespace, name)


def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # A fresh registry has none of Kopf's default login handlers: in a pod the
    # service account, elsewhere $KUBECONFIG / ~/.kube/config (no client library).
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def build_registry(
    settings: OperatorSettings | None = None, reconciler: Reconciler | None = None
) -> kopf.OperatorRegistry:
    """A Kopf registry with the ChatDeployment handlers of one `Reconciler`."""
    settings = settings or OperatorSettings()
    rec = reconciler or Reconciler(settings)
    registry = kopf.OperatorRegistry()
    cd = (GROUP, VERSION, PLURAL)

    kopf.on.login(registry=registry)(_login)
    kopf.on.startup(registry=registry)(rec.startup)
    kopf.on.cleanup(registry=registry)(rec.cleanup)

    def make(trigger: str) -> Callable[..., Awaitable[None]]:
        async def handler(
            body: kopf.Body, name: str, namespace: str, patch: kopf.Patch, logger: Any, **_: Any
        ) -> None:
            with rec.tracer.start_as_current_span(
                "reconcile ChatDeployment",
                attributes={
                    "k8s.namespace.name": namespace,
                    "chatfleet.chatdeployment.name": name,
                    "chatfleet.reconcile.trigger": trigger,
                },
            ):
                await rec.reconcile(
                    body=body,
                    name=name,
                    namespace=namespace,
                    patch=patch,
                    logger=logger,
                    trigger=trigger,
                )

        handler.__name__ = f"reconcile_on_{trigger}"
        return handler

    kopf.on.create(*cd, registry=registry, id="reconcile")(make("create"))
    kopf.on.update(*cd, registry=registry, id="reconcile")(make("update"))
    kopf.on.resume(*cd, registry=registry, id="reconcile")(make("resume"))
    # Kopf stamps nothing on the objects for these: no finalizer, no annotations.
    kopf.on.event(*cd, registry=registry, id="forget-deleted")(rec.on_chatdeployment_event)
    for resource in (("ray.io", "v1", "rayservices"), ("v1", "services")):
        kopf.on.event(
            *resource,
            registry=registry,
            id=f"owned-{resource[-1]}",
            labels={OWNER_LABEL: kopf.PRESENT},
        )(rec.on_owned_event)
    return registry
