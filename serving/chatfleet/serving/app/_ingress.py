"""The ingress deployment: the FastAPI app over handles to the other deployments."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

import ray
from fastapi import FastAPI
from ray import serve

from chatfleet.serving import telemetry
from chatfleet.serving._drain_request import DrainRequest
from chatfleet.serving.api import LocalRouterClient, Metrics, create_app
from chatfleet.serving.app._admission import EngineAdmission
from chatfleet.serving.app._handles import Handle, HandleEngineClient, HandleRoutingClient
from chatfleet.serving.app._metrics import RayMetricsMirror
from chatfleet.serving.app._replica import _GRACEFUL_SHUTDOWN_S, _favour_the_event_loop
from chatfleet.serving.auth import Authenticator
from chatfleet.serving.config import AppConfig
from chatfleet.serving.relay import Relay
from chatfleet.serving.routing import Router
from chatfleet.serving.store import Store

#: How often a replica looks for a drain request.
_DRAIN_POLL_S = 0.2


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
@serve.ingress()
class Ingress:
    """HTTP, SSE and WebSocket front door: the FastAPI app over engine handles."""

    def __init__(
        self,
        config: AppConfig,
        engines: Mapping[str, Handle],
        classifier: Handle | None = None,
        compressor: Handle | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        _favour_the_event_loop()
        tracer_provider = telemetry.configure_tracing(config.telemetry, component="ingress")
        routing = HandleRoutingClient(classifier, compressor)
        # The router runs here, in the ingress (its hysteresis state lives here too):
        # one handle hop to the classifier (and compressor) per routed request, none
        # to a router replica in between.
        router = None
        if config.routing is not None and classifier is not None:
            router = LocalRouterClient(
                Router(
                    config,
                    routing.classify_prompt,
                    routing.compress_prompt if compressor is not None else None,
                    tracer_provider=tracer_provider,
                )
            )
        node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        relay = self._relay = Relay(node_ip) if config.coalesce.relay else None
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
                    engines[model.name],
                    EngineAdmission(model, metrics),
                    relay=relay,
                    alone=model.autoscaling is None,
                )
                for model in config.models
            },
            router=router,
            # The classifier's sentence encoder answers /v1/embeddings too (same replicas).
            embeddings=routing
            if classifier is not None
            and config.classifier is not None
            and config.classifier.backend == "embedding"
            else None,
            classifier=routing if classifier is not None else None,
            compressor=routing if compressor is not None else None,
            store=store,
            auth=auth,
            metrics=metrics,
            tracer_provider=tracer_provider,
            on_startup=self._watch_for_drain,
        )
        self._drain_request = DrainRequest(config.server.port)
        self._drain_watch: asyncio.Task[None] | None = None

    async def _watch_for_drain(self) -> None:
        self._drain_watch = asyncio.create_task(self._drain_when_asked())

    async def _drain_when_asked(self) -> None:
        """Drain when `chatfleet serve` (signalled) or a preStop hook asks (_drain_request).

        Polling a file costs a stat call per interval, off the request path.
        """
        replica, request = str(os.getpid()), self._drain_request
        request.register(replica)
        while not request.requested():  # noqa: ASYNC110 (a file, not an Event)
            await asyncio.sleep(_DRAIN_POLL_S)
        drain = self._app.state.gateway.drain
        drain.begin()
        request.draining(replica)  # each replica notices within _DRAIN_POLL_S: say when
        await drain.run()
        request.drained(replica)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    async def __del__(self) -> None:
        # Serve calls this when the replica stops: hang up the engines' relay links
        # (their streams end with RelayLost, not silence) and stop the metrics thread.
        if self._drain_watch is not None:
            self._drain_watch.cancel()
        if self._relay is not None:
            await self._relay.close()
        self._metrics_mirror.stop()
