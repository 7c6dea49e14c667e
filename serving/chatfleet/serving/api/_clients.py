"""How the ingress reaches models, the router, the classifier and the compressor.

Protocols the gateway depends on, and in-process implementations (tests and
``create_app`` without Ray); under Ray Serve, ``chatfleet.serving.app._handles``
implements them over deployment handles.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from chatfleet.serving import telemetry
from chatfleet.serving.config import CoalesceConfig
from chatfleet.serving.engines import Engine, coalesce, traced_generation
from chatfleet.serving.protocol import (
    Chunk,
    Classification,
    Compression,
    Embeddings,
    GenerationRequest,
)
from chatfleet.serving.protocol import Message as ChatMessage
from chatfleet.serving.routing import PreviousRoute, Router, RoutingDecision
from chatfleet.serving.routing.classifier import EmbeddingClassifier


class ModelLoading(list[Chunk]):
    """An empty batch an `EngineClient` may yield before the first one: no replica of the
    model is running and the request waits while one starts (`Gateway.open` tells the
    client). Consumers that do not know it see a batch with nothing in it."""


class EngineClient(Protocol):
    """How the ingress reaches one model: batches of chunks (the first may be a
    `ModelLoading` notice), and readiness."""

    def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]: ...

    async def is_ready(self) -> bool: ...


class RouterClient(Protocol):
    """How the ingress asks for a routing decision (one call per request)."""

    async def decide(
        self, messages: list[ChatMessage], previous: PreviousRoute | None, compress: bool
    ) -> RoutingDecision: ...

    async def rankings(self) -> dict[str, Any]: ...


class ClassifierClient(Protocol):
    async def classify(
        self,
        prompt: str,
        labels: list[str] | None,
        descriptions: dict[str, str] | None,
        multi_label: bool,
    ) -> Classification: ...


class EmbeddingsClient(Protocol):
    """How the ingress asks for sentence embeddings (``/v1/embeddings``)."""

    async def embed(self, texts: list[str]) -> Embeddings: ...


class LocalEmbeddingsClient:
    """An embedding classifier's encoder in this process (tests, ``create_app`` alone)."""

    def __init__(self, classifier: EmbeddingClassifier) -> None:
        self.classifier = classifier

    async def embed(self, texts: list[str]) -> Embeddings:
        return await asyncio.to_thread(self.classifier.embed, texts)


class CompressorClient(Protocol):
    async def compress(self, context: str, question: str, ratio: float | None) -> Compression: ...


class LocalRouterClient:
    """A `Router` in this process."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def decide(
        self, messages: list[ChatMessage], previous: PreviousRoute | None, compress: bool
    ) -> RoutingDecision:
        return await self.router.decide(messages, previous, compress)

    async def rankings(self) -> dict[str, Any]:
        return self.router.rankings()


class LocalEngineClient:
    """An engine in this process, with the same token batching as over Ray."""

    def __init__(
        self,
        engine: Engine,
        coalescing: CoalesceConfig | None = None,
        *,
        tracer_provider: telemetry.TracerProvider | None = None,
    ) -> None:
        self.engine = engine
        self.coalescing = coalescing or CoalesceConfig()
        self.started = False
        self._tracer = telemetry.get_tracer(tracer_provider)

    async def start(self) -> None:
        await self.engine.start()
        self.started = True

    def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]:
        return coalesce(
            traced_generation(
                self.engine.stream(request), request, self.engine.model.engine, self._tracer
            ),
            max_tokens=self.coalescing.max_tokens,
            max_delay=self.coalescing.max_delay_ms / 1000,
            runs_ahead=self.engine.runs_ahead,
            limit=request.max_tokens,
        )

    async def is_ready(self) -> bool:
        return self.started
