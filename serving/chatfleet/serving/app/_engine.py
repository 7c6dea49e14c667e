"""The engine deployment: one model's engine, streaming batched chunks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from chatfleet.serving import telemetry
from chatfleet.serving.app._early import EarlyStarts
from chatfleet.serving.app._replica import _GRACEFUL_SHUTDOWN_S, _favour_the_event_loop
from chatfleet.serving.config import CoalesceConfig, ModelConfig, TelemetryConfig
from chatfleet.serving.engines import (
    coalesce,
    create_engine,
    delay_for_load,
    traced_generation,
)
from chatfleet.serving.errors import ChatfleetError, EngineError, RelayLost
from chatfleet.serving.protocol import Chunk, GenerationRequest, WireRequest, request_from_json
from chatfleet.serving.relay import RelayAddress
from chatfleet.serving.relay_links import LinkLost, Links, _Link, relay_batches

logger = logging.getLogger(__name__)


def _replica_id() -> str:
    """This replica's id, as Serve's router names it (empty outside Serve)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return ""


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
class EngineDeployment:
    """One model's engine. Streams batched chunks to the ingress."""

    async def __init__(  # type: ignore[misc]
        self,
        model: ModelConfig,
        coalescing: CoalesceConfig,
        tracing: TelemetryConfig | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        _favour_the_event_loop()
        provider = telemetry.configure_tracing(
            tracing or TelemetryConfig(), component=f"engine-{model.name}"
        )
        self._tracer = telemetry.get_tracer(provider)
        self._engine = create_engine(model)
        # Requests the ingress sends ahead on a link start here, before their handle call.
        self._early = EarlyStarts()
        self._admitted = model.admitted_requests()
        self._links = Links(replica=_replica_id(), on_item=self._on_link_item)
        self._coalescing = coalescing
        # Outcomes; streams on the token relay (the rest: on the handle); copies of
        # requests sent ahead on a link, and how many of them started the generation
        # (the others came after their handle call, or when the replica was full).
        self._stats = {
            "active": 0,
            "completed": 0,
            "cancelled": 0,
            "failed": 0,
            "relayed": 0,
            "ahead": 0,
            "early": 0,
        }
        await self._engine.start()
        logger.info("engine %s (%s) ready", model.name, model.engine)

    async def generate(
        self,
        request: WireRequest,
        relay: RelayAddress | None = None,
        relay_key: str = "",
    ) -> AsyncGenerator[list[Chunk] | int, None]:
        """Batches of ``request``'s answer; with ``relay``, sent on the token relay
        instead, and then only their count is yielded (see `chatfleet.serving.relay`).
        The request is decoded here unless the copy sent ahead already runs it."""
        started = self._early.claim(relay_key) if relay_key else None
        if started is not None:  # the copy sent ahead on the link runs it: join it
            try:
                for message in await started:
                    yield message
            finally:
                started.cancel()  # the call was cancelled (a no-op once it is done)
            return
        link = await self._links.get(relay) if relay is not None else None
        async for message in self._run(request.decode(), link, relay_key):
            yield message

    def _on_link_item(self, link: _Link, item: list[Any]) -> None:
        """A request the ingress sent ahead on ``link`` (``start``), or withdrew."""
        op, stream_id, *rest = item
        if op == "drop":
            self._early.drop(stream_id)
        elif op == "start":
            self._stats["ahead"] += 1
            if self._stats["active"] < self._admitted:  # full: the handle call waits
                request = request_from_json(rest[0])
                self._early.start(stream_id, lambda: self._run_ahead(request, link, stream_id))

    async def _run_ahead(
        self, request: GenerationRequest, link: _Link, stream_id: str
    ) -> list[Any]:
        self._stats["early"] += 1
        generation = self._run(request, link, stream_id)
        try:
            return [message async for message in generation]
        finally:
            await generation.aclose()

    async def _run(
        self, request: GenerationRequest, link: _Link | None, relay_key: str
    ) -> AsyncGenerator[list[Chunk] | int, None]:
        self._stats["active"] += 1
        outcome = "completed"
        batches = coalesce(
            traced_generation(
                self._engine.stream(request), request, self._engine.model.engine, self._tracer
            ),
            max_tokens=self._coalescing.max_tokens,
            max_delay=lambda: delay_for_load(self._coalescing, self._stats["active"]),
            runs_ahead=self._engine.runs_ahead,
            limit=request.max_tokens,
        )
        source: AsyncGenerator[list[Chunk] | int, None] = (
            batches if link is None else relay_batches(link, relay_key, batches)
        )
        if link is not None:
            self._stats["relayed"] += 1
        try:
            async for message in source:
                yield message
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        except ChatfleetError:
            outcome = "failed"
            raise
        except LinkLost as exc:
            outcome = "failed"
            raise RelayLost(f"lost the token relay to the ingress: {exc}") from exc
        except Exception as exc:
            outcome = "failed"
            logger.exception("engine %s failed", self._engine.name)
            raise EngineError(f"model {self._engine.name} failed") from exc
        finally:
            self._stats["active"] -= 1
            self._stats[outcome] += 1
            if source is not batches:
                await source.aclose()
            await batches.aclose()

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict[str, int]:
        """Counts of generations by outcome (how tests observe cancellation)."""
        return dict(self._stats)

    async def __del__(self) -> None:
        self._early.close()
        self._links.close()
        await self._engine.close()
