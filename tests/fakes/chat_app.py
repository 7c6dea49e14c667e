"""The ingress app over fake engines and a real store, for conversation and session tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from chatfleet.serving.api import LocalEngineClient, LocalRouterClient, create_app
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.protocol import Chunk, Classification, GenerationRequest
from chatfleet.serving.routing import Router
from chatfleet.serving.store import Store

__all__ = ["ChatApp", "RecordingEngine", "fake_model"]


def fake_model(name: str = "fake", **fake: Any) -> ModelConfig:
    return ModelConfig(name=name, engine="fake", fake=fake)


class RecordingEngine(FakeEngine):
    """A fake engine that keeps every request it was given (to see the prompt)."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__(model)
        self.requests: list[GenerationRequest] = []

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        async for chunk in super().stream(request):
            yield chunk


class ChatApp:
    """``create_app`` with a store; ``start()`` stands in for the lifespan under ASGITransport."""

    def __init__(
        self,
        store: Store,
        *models: ModelConfig,
        classify: Callable[[str], Awaitable[Classification]] | None = None,
        **fields: Any,
    ) -> None:
        self.config = AppConfig(
            models=list(models) or [fake_model()], auth={"enabled": False}, **fields
        )
        router = None
        if classify is not None:
            router = LocalRouterClient(Router(self.config, classify))
        self.store = store
        self.engines = {m.name: RecordingEngine(m) for m in self.config.models}
        self.clients = {
            n: LocalEngineClient(e, self.config.coalesce) for n, e in self.engines.items()
        }
        self.app = create_app(
            self.config, self.clients, store=store, router=router, on_startup=self._start_engines
        )

    async def _start_engines(self) -> None:
        for client in self.clients.values():
            await client.start()

    async def start(self) -> None:
        await self.store.start()
        await self._start_engines()

    def http(self, base_url: str = "http://chatfleet") -> httpx.AsyncClient:
        if base_url.startswith("http://127.0.0.1"):
            return httpx.AsyncClient(base_url=base_url, timeout=30)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=base_url)
