"""Ray Serve wiring: the only place deployments are bound.

``build_app`` is the application builder that ``serve run``, ``chatfleet serve``
and a RayService's serveConfigV2 (``import_path: chatfleet.serving.app:build_app``)
use. It lays out one ``EngineDeployment`` per model and one ``Ingress`` that
hosts the FastAPI app; the ingress streams straight from the engine chosen for a
request, one handle hop, with tokens already batched by the engine replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from chatfleet.serving.api import create_app
from chatfleet.serving.config import AppConfig, CoalesceConfig, ModelConfig, load_config
from chatfleet.serving.engines import coalesce, create_engine
from chatfleet.serving.errors import ChatfleetError, EngineError
from chatfleet.serving.protocol import Chunk, GenerationRequest

__all__ = ["APP_NAME", "EngineDeployment", "Ingress", "build_app"]

logger = logging.getLogger(__name__)

APP_NAME = "chatfleet"
# Replicas drain for this long on shutdown or redeploy; streams past it are cut.
_GRACEFUL_SHUTDOWN_S = 10.0


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
class EngineDeployment:
    """One model's engine. Streams batched chunks to the ingress."""

    async def __init__(self, model: ModelConfig, coalescing: CoalesceConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        self._engine = create_engine(model)
        self._coalescing = coalescing
        self._stats = {"active": 0, "completed": 0, "cancelled": 0, "failed": 0}
        await self._engine.start()
        logger.info("engine %s (%s) ready", model.name, model.engine)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[Chunk]]:
        self._stats["active"] += 1
        outcome = "completed"
        batches = coalesce(
            self._engine.stream(request),
            max_tokens=self._coalescing.max_tokens,
            max_delay=self._coalescing.max_delay_ms / 1000,
        )
        try:
            async for batch in batches:
                yield batch
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        except ChatfleetError:
            outcome = "failed"
            raise
        except Exception as exc:
            outcome = "failed"
            logger.exception("engine %s failed", self._engine.name)
            raise EngineError(f"model {self._engine.name} failed") from exc
        finally:
            self._stats["active"] -= 1
            self._stats[outcome] += 1
            await batches.aclose()

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict[str, int]:
        """Counts of generations by outcome (how tests observe cancellation)."""
        return dict(self._stats)

    async def __del__(self) -> None:
        await self._engine.close()


class HandleEngineClient:
    """The ingress's view of an `EngineDeployment`: one streaming handle call."""

    def __init__(self, handle: DeploymentHandle, ready_timeout_s: float = 5.0) -> None:
        self._stream = handle.options(stream=True)
        self._handle = handle
        self._ready_timeout_s = ready_timeout_s

    async def batches(self, request: GenerationRequest) -> AsyncIterator[list[Chunk]]:
        response: DeploymentResponseGenerator = self._stream.generate.remote(request)
        finished = False
        try:
            async for batch in response:
                yield batch
            finished = True
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, ChatfleetError) else None
            if cause is None:
                raise EngineError(f"model {request.model} failed") from exc
            raise cause from None
        finally:
            if not finished:
                # The client went away (or we failed): stop the engine's generation.
                response.cancel()

    async def is_ready(self) -> bool:
        ready: bool = await asyncio.wait_for(
            self._handle.ready.remote(), timeout=self._ready_timeout_s
        )
        return ready


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
@serve.ingress()
class Ingress:
    """HTTP, SSE and WebSocket front door: the FastAPI app over engine handles."""

    def __init__(self, config: AppConfig, engines: Mapping[str, DeploymentHandle]) -> None:
        logging.basicConfig(level=logging.INFO)
        self._app = create_app(
            config, {name: HandleEngineClient(handle) for name, handle in engines.items()}
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app


def _engine_deployment(model: ModelConfig, coalescing: CoalesceConfig) -> Any:
    return EngineDeployment.options(
        name=f"engine-{model.name}",
        num_replicas=model.num_replicas,
        max_ongoing_requests=model.max_ongoing_requests,
        ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
    ).bind(model, coalescing)


def build_app(args: AppConfig | Mapping[str, Any] | None = None) -> Any:
    """Build the chatfleet Ray Serve application.

    ``args`` is an `AppConfig`, a mapping of its fields (serveConfigV2 ``args``),
    ``{"config_file": path}``, or nothing (environment and defaults).
    """
    if isinstance(args, AppConfig):
        config = args
    elif args and set(args) == {"config_file"}:
        config = load_config(Path(str(args["config_file"])))
    else:
        config = load_config(overrides=dict(args or {}))
    engines = {m.name: _engine_deployment(m, config.coalesce) for m in config.models}
    return Ingress.options(
        name="ingress",
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    ).bind(config, engines)
