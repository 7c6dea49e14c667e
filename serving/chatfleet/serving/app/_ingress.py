"""The ingress deployment: the FastAPI app over handles to the other deployments."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import ray
from fastapi import FastAPI
from ray import serve

from chatfleet.serving import telemetry
from chatfleet.serving.api import Metrics, create_app
from chatfleet.serving.app._admission import EngineAdmission
from chatfleet.serving.app._handles import Handle, HandleEngineClient, HandleRouterClient
from chatfleet.serving.app._metrics import RayMetricsMirror
from chatfleet.serving.app._replica import _GRACEFUL_SHUTDOWN_S, _favour_the_event_loop
from chatfleet.serving.auth import Authenticator
from chatfleet.serving.config import AppConfig
from chatfleet.serving.relay import Relay
from chatfleet.serving.store import Store


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
@serve.ingress()
class Ingress:
    """HTTP, SSE and WebSocket front door: the FastAPI app over engine handles."""

    def __init__(
        self,
        config: AppConfig,
        engines: Mapping[str, Handle],
        router: Handle | None = None,
        classifier: Handle | None = None,
        compressor: Handle | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        _favour_the_event_loop()
        routing = HandleRouterClient(router, classifier, compressor)
        node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        relay = Relay(node_ip) if config.coalesce.relay else None
        # Opened (and migrated) by the app's lifespan. Sessions run in this replica:
        # their live events reach its /ws subscribers only; the database is shared.
        store = Store(config.store)
        auth = None
        if config.auth.enabled:
            # Revocations live in the store: they survive restarts and are shared.
            auth = Authenticator.from_config(config.auth, store, data_dir=config.store.data_dir)
        metrics = Metrics()
        # Recorded once, in the registry /metrics serves; the mirror's thread copies it
        # into Ray's metrics system, which is what a cluster scrapes (per replica).
        self._metrics_mirror = RayMetricsMirror(metrics)
        self._metrics_mirror.start()
        self._app = create_app(
            config,
            {
                model.name: HandleEngineClient(
                    engines[model.name], EngineAdmission(model, metrics), relay=relay
                )
                for model in config.models
            },
            router=routing if router is not None else None,
            classifier=routing if classifier is not None else None,
            compressor=routing if compressor is not None else None,
            store=store,
            auth=auth,
            metrics=metrics,
            tracer_provider=telemetry.configure_tracing(config.telemetry, component="ingress"),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
