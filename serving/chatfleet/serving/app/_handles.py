"""How the ingress reaches other deployments: handle clients.

`HandleEngineClient` and `HandleRoutingClient` are what ``create_app`` receives
under Ray Serve (see `chatfleet.serving.api`); ``_unwrapped`` and
``_local_transport`` are what every handle call here goes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, TypeVar

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from chatfleet.serving import telemetry
from chatfleet.serving.app._admission import EngineAdmission, running_replicas, sole_replica
from chatfleet.serving.errors import ChatfleetError, EngineError, ModelBusy, RelayLost
from chatfleet.serving.protocol import (
    Chunk,
    Classification,
    Compression,
    Embeddings,
    GenerationRequest,
    WireRequest,
)
from chatfleet.serving.relay import Declined, Relay

_T = TypeVar("_T")
Handle = DeploymentHandle[Any]


async def _unwrapped(call: Awaitable[_T]) -> _T:
    """Await a handle call; re-raise our own errors as themselves, not RayTaskError."""
    try:
        return await call
    except RayTaskError as exc:
        if isinstance(exc.cause, ChatfleetError):
            raise exc.cause from None
        raise


def _local_transport(handle: Handle) -> Handle:
    """``handle`` on the transport this process's Serve runs: gRPC in throughput mode.

    A handle carries its transport from the process that built the application, fixed
    when that process imported Serve; ``serve.run`` from a driver that imported Serve
    before RAY_SERVE_THROUGHPUT_OPTIMIZED was set would leave Ray actor calls, the
    slower path, between replicas that all serve gRPC.
    """
    # Private Ray: the flag lives in ray.serve._private.constants and the transport is
    # the underscored `_by_reference` option. Ray fixes a handle's `_by_reference` as a
    # dataclass default (`not RAY_SERVE_USE_GRPC_BY_DEFAULT` in
    # ray/serve/_private/handle_options.py) when the building process imports Serve,
    # and pickles it with the handle. This would go if Ray chose the transport in the
    # process that makes the call, or offered it as a public handle option.
    from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT

    return handle.options(_by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)


def _maybe_local_transport(handle: Handle | None) -> Handle | None:
    return None if handle is None else _local_transport(handle)


class HandleRoutingClient:
    """The classifier and compressor deployments, as the ingress's in-process `Router`
    and the ``/api/classify`` and ``/api/compress`` handlers call them."""

    def __init__(self, classifier: Handle | None, compressor: Handle | None) -> None:
        self._classifier = _maybe_local_transport(classifier)
        self._compressor = _maybe_local_transport(compressor)

    async def classify_prompt(self, prompt: str) -> Classification:
        """The configured categories' classification of ``prompt`` (the router's call)."""
        return await self.classify(prompt, None, None, False)

    async def compress_prompt(self, context: str, question: str) -> Compression:
        """``context`` compressed at the configured ratio (the router's call)."""
        return await self.compress(context, question, None)

    async def classify(
        self,
        prompt: str,
        labels: list[str] | None,
        descriptions: dict[str, str] | None,
        multi_label: bool,
    ) -> Classification:
        assert self._classifier is not None
        return await _unwrapped(
            self._classifier.classify.remote(
                prompt, labels, descriptions, multi_label, trace_context=telemetry.inject()
            )
        )

    async def embed(self, texts: list[str]) -> Embeddings:
        assert self._classifier is not None
        return await _unwrapped(
            self._classifier.embed.remote(texts, trace_context=telemetry.inject())
        )

    async def compress(self, context: str, question: str, ratio: float | None) -> Compression:
        assert self._compressor is not None
        return await _unwrapped(
            self._compressor.compress.remote(
                context, question, ratio, trace_context=telemetry.inject()
            )
        )


class HandleEngineClient:
    """The ingress's view of an `EngineDeployment`: one streaming handle call."""

    def __init__(
        self,
        handle: Handle,
        admission: EngineAdmission,
        ready_timeout_s: float = 5.0,
        relay: Relay | None = None,
        *,
        alone: bool = False,
    ) -> None:
        handle = _local_transport(handle)
        # Whether a request may go to the engine on the relay's link alone, without a
        # handle call (`Relay.run`): not for a model that autoscales, whose autoscaler
        # counts the calls Serve routes.
        self._alone = alone
        self._stream = handle.options(stream=True)
        self._handle = handle
        self._admission = admission
        self._ready_timeout_s = ready_timeout_s
        self._relay = relay

    async def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]:
        address = None if self._relay is None else await self._relay.start()
        key = uuid.uuid4().hex
        first: asyncio.Future[list[Chunk]] | None = None
        declined = False
        wire = WireRequest.of(request)
        if self._alone and self._relay is not None and address is not None:
            # One replica (Serve's router has no choice to make) with a link: the
            # request goes on the link alone, and the handle call only if it is full.
            replica = sole_replica(self._stream)
            alone = None if replica is None else self._relay.run(replica, key, wire)
            if alone is not None:
                try:
                    opening = await anext(alone)
                except Declined:
                    key = uuid.uuid4().hex  # the handle call below, as a new stream
                    declined = True  # it waits in the replica: queued until its first batch
                except StopAsyncIteration:
                    return
                else:
                    async for batch in self._after(opening, alone):
                        yield batch
                    return
        if self._relay is None or address is None:
            response: DeploymentResponseGenerator[Any] = self._stream.generate.remote(wire)  # type: ignore[assignment]
            source: AsyncIterator[list[Chunk]] = response
        else:
            response = self._stream.generate.remote(wire, address, key)  # type: ignore[assignment]
            # Registered before the engine can send on the relay, so before admission.
            source = self._relay.receive(key, response)
            # Read from now on: the first batch may come in before Serve says a replica
            # took the request, and then admits it (`EngineAdmission.admitted`).
            first = asyncio.ensure_future(anext(source))
        try:
            async for notice in self._admission.admitted(
                response,
                self._running_replicas,
                started=first,
                queued_until=first if declined else None,
            ):
                yield notice
        except BaseException:
            if first is not None:
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                await source.aclose()  # type: ignore[attr-defined]
            if self._relay is not None:
                self._relay.forget(key)
            raise
        finished = False
        try:
            if first is not None:
                with contextlib.suppress(StopAsyncIteration):
                    yield await first
            async for batch in source:
                yield batch
            finished = True
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, ChatfleetError) else None
            if cause is None:
                raise EngineError(f"model {request.model} failed") from exc
            if isinstance(cause, ModelBusy):
                self._admission.refused_by_replica()
            raise cause from None
        except ConnectionError as exc:  # the relay's link or socket, not the model
            raise RelayLost(f"lost the token relay from model {request.model}: {exc}") from exc
        finally:
            if not finished:
                # The client went away (or we failed): stop the engine's generation.
                response.cancel()  # type: ignore[no-untyped-call]
                if source is not response:
                    await source.aclose()  # type: ignore[attr-defined]

    @staticmethod
    async def _after(
        first: list[Chunk], rest: AsyncGenerator[list[Chunk], None]
    ) -> AsyncGenerator[list[Chunk], None]:
        """``first``, then the batches of a request run on the link alone (the relay
        raises a lost link as `RelayLost` itself); closed, so withdrawn from the engine,
        if its reader leaves early."""
        try:
            yield first
            async for batch in rest:
                yield batch
        finally:
            await rest.aclose()

    def _running_replicas(self) -> int | None:
        return running_replicas(self._stream)

    async def is_ready(self) -> bool:
        if self._admission.scales_to_zero:
            # Ready on demand: a readiness call would start a replica of an idle model
            # (and keep it from ever scaling to zero under a prober).
            return True
        ready: bool = await asyncio.wait_for(
            self._handle.ready.remote(), timeout=self._ready_timeout_s
        )
        return ready
