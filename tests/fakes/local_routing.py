"""The embedded classifier and compressor in the test's process, as the ingress calls them.

Real models (MiniLM, LLMLingua on SmolLM2), loaded once per test module; their
sync calls run in a thread as the Ray deployments run them.
"""

from __future__ import annotations

import asyncio

from chatfleet.serving.api import LocalRouterClient
from chatfleet.serving.config import AppConfig
from chatfleet.serving.protocol import Classification, Compression
from chatfleet.serving.routing import Compressor, Router, create_classifier

__all__ = ["LocalRouting"]


class LocalRouting:
    """A `ClassifierClient` and a `CompressorClient` over the models of ``config``."""

    def __init__(self, config: AppConfig) -> None:
        assert config.classifier is not None and config.compressor is not None
        self.classifier = create_classifier(config.classifier)
        self.compressor = Compressor(config.compressor)
        self.classifier.load()
        self.compressor.load()

    def router(self, config: AppConfig) -> LocalRouterClient:
        async def classify(prompt: str) -> Classification:
            return await self.classify(prompt, None, None, False)

        async def compress(context: str, question: str) -> Compression:
            return await self.compress(context, question, None)

        return LocalRouterClient(Router(config, classify, compress))

    async def classify(
        self,
        prompt: str,
        labels: list[str] | None,
        descriptions: dict[str, str] | None,
        multi_label: bool,
    ) -> Classification:
        return await asyncio.to_thread(
            self.classifier.classify, prompt, labels, descriptions, multi_label
        )

    async def compress(self, context: str, question: str, ratio: float | None) -> Compression:
        return await asyncio.to_thread(self.compressor.compress, context, question, ratio)
