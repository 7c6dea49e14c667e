"""The engine deployment: one model's engine, streaming batched chunks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine
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
from chatfleet.serving.errors import ChatfleetError, EngineError, ModelBusy, RelayLost
from chatfleet.serving.protocol import Chunk, GenerationRequest, WireRequest, request_from_json
from chatfleet.serving.relay import _DECLINED, _END, RelayAddress, error_item
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
        # Generations admitted (running, or started and about to): the replica's own
        # count against ``admitted``, since requests run on the link alone are not
        # Serve's to count. Handle calls that find it full wait here for room, bounded.
        self._occupied = 0
        self._waiting = 0
        self._room = asyncio.Event()
        self._queue_wait_s = model.admission.max_queue_wait_s
        self._retry_after_s = model.admission.retry_after_s
        self._stopping = False
        self._links = Links(replica=_replica_id(), on_item=self._on_link_item)
        self._coalescing = coalescing
        # Outcomes; streams on the token relay (the rest: on the handle); copies of
        # requests sent ahead on a link, and how many of them started the generation
        # (the others came after their handle call, or when the replica was full);
        # requests run on a link alone, and those declined (full or stopping).
        self._stats = {
            "active": 0,
            "completed": 0,
            "cancelled": 0,
            "failed": 0,
            "relayed": 0,
            "ahead": 0,
            "early": 0,
            "alone": 0,
            "declined": 0,
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
        await self._wait_for_room()
        self._occupied += 1
        try:
            link = await self._links.get(relay) if relay is not None else None
            async for message in self._run(request.decode(), link, relay_key):
                yield message
        finally:
            self._release()

    def _has_room(self) -> bool:
        """Whether a request on the link may start now (none waits before it)."""
        return not self._stopping and not self._waiting and self._occupied < self._admitted

    def _release(self) -> None:
        self._occupied -= 1
        self._room.set()

    async def _wait_for_room(self) -> None:
        """Wait while the replica is full; `ModelBusy` after the model's queue wait.

        Serve's router admits handle calls up to ``max_ongoing_requests`` by its own
        count, which leaves out the requests run on a link alone: the replica's count
        decides, and a call that finds it full waits here as it would in the router.
        """
        if self._occupied < self._admitted:
            return
        self._waiting += 1
        try:
            async with asyncio.timeout(self._queue_wait_s):
                while self._occupied >= self._admitted:
                    self._room.clear()
                    await self._room.wait()
        except TimeoutError:
            raise ModelBusy(
                f"model {self._engine.name} is at capacity (waited {self._queue_wait_s:g} s);"
                f" retry in {self._retry_after_s} s",
                retry_after=self._retry_after_s,
            ) from None
        finally:
            self._waiting -= 1

    def _on_link_item(self, link: _Link, item: list[Any]) -> None:
        """A request the ingress sent ahead on ``link`` (``start``), or withdrew."""
        op, stream_id, *rest = item
        if op == "drop":
            self._early.drop(stream_id)
        elif op == "start":
            self._stats["ahead"] += 1
            if self._has_room():  # else the handle call runs it, waiting for room
                request = request_from_json(rest[0])
                self._admit(stream_id, lambda: self._run_ahead(request, link, stream_id))
        elif op == "run":  # no handle call follows: its end goes on the link too
            if not self._has_room():
                self._stats["declined"] += 1
                with contextlib.suppress(LinkLost):
                    link.send(stream_id, {_DECLINED: True})
                return
            request = request_from_json(rest[0])
            self._admit(stream_id, lambda: self._run_alone(request, link, stream_id), alone=True)

    def _admit(
        self,
        stream_id: str,
        run: Callable[[], Coroutine[Any, Any, list[Any]]],
        *,
        alone: bool = False,
    ) -> None:
        if self._early.start(stream_id, run, alone=alone, on_end=self._release):
            self._occupied += 1

    async def _run_alone(
        self, request: GenerationRequest, link: _Link, stream_id: str
    ) -> list[Any]:
        """A request the ingress sent on the link alone: its batches, then how it ended
        (how many went, or its error), all on the link."""
        self._stats["alone"] += 1
        generation = self._run(request, link, stream_id)
        try:
            sent = 0
            async for message in generation:
                if isinstance(message, int):  # on the relay only the count comes, at the end
                    sent = message
            link.send(stream_id, {_END: sent})
        except RelayLost:
            pass  # the link is gone: the ingress ends the stream with RelayLost itself
        except ChatfleetError as exc:
            with contextlib.suppress(LinkLost):
                link.send(stream_id, error_item(exc))
        finally:
            await generation.aclose()
        return []

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
        # Serve waits for the calls it routed before this; requests run on a link alone
        # are the replica's to wait for: none starts from now on, and the running ones
        # may end (bounded: Serve stops the replica at its graceful shutdown timeout).
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_GRACEFUL_SHUTDOWN_S / 2):
                while len(self._early):
                    self._room.clear()  # set as each generation ends
                    await self._room.wait()
        self._early.close()
        self._links.close()
        await self._engine.close()
