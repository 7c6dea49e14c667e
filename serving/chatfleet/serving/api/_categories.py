"""Routing among a client's own categories (``possible_categories``), in the ingress.

`Router` is pure logic over a classify and a compress call, so `CategoryRouting` routes
with the same rules (routes, fallbacks, hysteresis, compression) as the shared router,
only classifying over the client's categories, on the classifier deployment.
"""

from __future__ import annotations

from chatfleet.serving import telemetry
from chatfleet.serving.api._clients import ClassifierClient, CompressorClient
from chatfleet.serving.config import AppConfig
from chatfleet.serving.errors import NotConfigured
from chatfleet.serving.protocol import Classification, Compression
from chatfleet.serving.protocol import Message as ChatMessage
from chatfleet.serving.routing import PreviousRoute, Router, RoutingDecision


class CategoryRouting:
    """The router's decisions over the categories a client names."""

    def __init__(
        self,
        config: AppConfig,
        classifier: ClassifierClient | None,
        compressor: CompressorClient | None,
        tracer_provider: telemetry.TracerProvider | None = None,
    ) -> None:
        self.config = config
        self.classifier = classifier
        self.compressor = compressor
        self.tracer_provider = tracer_provider
        # The client has ruled the other categories out, so the confidence floor (which
        # sends prompts that fit no category well to the default model) does not apply.
        self._routing_among = (
            None
            if config.routing is None
            else config.model_copy(
                update={"routing": config.routing.model_copy(update={"confidence_threshold": 0.0})}
            )
        )

    async def decide(
        self,
        categories: list[str],
        messages: list[ChatMessage],
        previous: PreviousRoute | None,
    ) -> RoutingDecision:
        """The router's decision over ``categories`` alone, run here on the classifier."""
        classifier, compressor = self.classifier, self.compressor
        if classifier is None or self._routing_among is None:
            raise NotConfigured(
                "routing among given categories needs a classifier: none is configured here",
                param="possible_categories",
            )
        configured = self.config.classifier.categories if self.config.classifier else []
        described = {c.name: c.description for c in configured if c.description}
        descriptions = {n: described[n] for n in categories if n in described} or None

        async def classify(prompt: str) -> Classification:
            return await classifier.classify(prompt, categories, descriptions, False)

        async def compress(context: str, question: str) -> Compression:
            assert compressor is not None
            return await compressor.compress(context, question, None)

        router = Router(
            self._routing_among,
            classify,
            compress if compressor is not None else None,
            tracer_provider=self.tracer_provider,
        )
        if previous is not None and previous.category not in categories:
            previous = None  # a conversation never sticks to a category the client excluded
        return await router.decide(messages, previous, True)
