"""`Gateway`: the one seam every handler opens answers through (`Gateway.open`).

It resolves and checks the model, routes ``auto`` (the router, its hysteresis per
conversation, fallbacks while a model starts), admits the client against its budget,
opens the engine's stream with metrics and tracing, and meters the answer. The
clients it reaches models through are in `_clients`; the wire formats handlers
translate an `Answer` into are in `_wire`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from chatfleet.serving import telemetry
from chatfleet.serving.api._answers import Answer
from chatfleet.serving.api._categories import CategoryRouting
from chatfleet.serving.api._clients import (
    ClassifierClient,
    CompressorClient,
    EmbeddingsClient,
    EngineClient,
    ModelLoading,
    RouterClient,
)
from chatfleet.serving.api._drain import Drain
from chatfleet.serving.api._generation import generation_request
from chatfleet.serving.api._metrics import Metrics
from chatfleet.serving.api._schemas import SamplingFields, error_body
from chatfleet.serving.api._usage import UsageMeter
from chatfleet.serving.auth import Authenticator
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.errors import (
    ChatfleetError,
    EngineError,
    ModelNotFound,
)
from chatfleet.serving.protocol import Chunk, GenerationRequest
from chatfleet.serving.protocol import Message as ChatMessage
from chatfleet.serving.routing import PreviousRoute, RoutingDecision
from chatfleet.serving.store import Store

logger = logging.getLogger(__name__)

_ROUTE_MEMORY = 10_000

VERSION = "0.1.0"
AUTO_MODEL = "auto"
ROUTE_HEADER = "x-chatfleet-route"
CONVERSATION_HEADER = "x-chatfleet-conversation-id"


class Gateway:
    """The request handlers' shared state: config, engines, metrics."""

    def __init__(
        self,
        config: AppConfig,
        engines: Mapping[str, EngineClient],
        metrics: Metrics,
        *,
        router: RouterClient | None = None,
        classifier: ClassifierClient | None = None,
        compressor: CompressorClient | None = None,
        embeddings: EmbeddingsClient | None = None,
        store: Store | None = None,
        auth: Authenticator | None = None,
        tracer_provider: telemetry.TracerProvider | None = None,
    ) -> None:
        missing = [m.name for m in config.models if m.name not in engines]
        if missing:
            raise ValueError(f"no engine client for models: {', '.join(missing)}")
        self.config = config
        self.engines = engines
        self.metrics = metrics
        self.router = router
        self.classifier = classifier
        self.compressor = compressor
        self.embeddings = embeddings  # None: no /v1/embeddings
        self.store = store  # None: no conversations or sessions
        self.auth = auth  # None: auth is off
        self.usage = UsageMeter(store, config.auth, metrics)
        self.drain = Drain(config.server.drain_timeout_s)  # on shutdown (api._drain)
        # (owner, conversation) -> its last route, for hysteresis; keyed by owner too,
        # so one client's ids never steer another's routing. Bounded; replica-local
        # until conversations are stored (then the store holds it).
        self.routes: OrderedDict[tuple[str | None, str], PreviousRoute] = OrderedDict()
        self.created = int(time.time())
        self.tracer_provider = tracer_provider
        self.tracer = telemetry.get_tracer(tracer_provider)
        # Among a client's own categories, routed here on the classifier.
        self.categories = CategoryRouting(config, classifier, compressor, tracer_provider)

    async def model_states(self) -> dict[str, str]:
        """Each model's state: ``ready``, ``loading`` or ``unavailable``."""
        states = {}
        for name, client in self.engines.items():
            try:
                states[name] = "ready" if await client.is_ready() else "loading"
            except Exception:
                logger.warning("readiness check of %s failed", name, exc_info=True)
                states[name] = "unavailable"
        return states

    async def open(
        self,
        model: str | None,
        messages: list[ChatMessage],
        sampling: SamplingFields,
        *,
        conversation_id: str | None = None,
        owner: str | None = None,
        categories: list[str] | None = None,
        accepted_at: float | None = None,
        on_loading: Callable[[str], object] | None = None,
    ) -> Answer:
        """Open one answer: the one path every handler takes to a model.

        ``model`` names a served model, ``auto`` (the router decides, among
        ``categories`` when given, sticking to the last route of ``owner``'s
        ``conversation_id``, and falls back while no model has started), or ``None``
        for the default. Errors before the first token raise here (a 4xx/5xx for the
        handler); later ones end the answer's stream. Metrics and the engine's trace
        span are taken care of. ``owner`` is the client the answer is for: its budget
        is checked first (`BudgetExceeded`) and its usage counted when the answer ends.
        ``on_loading(model)`` is called while the answer waits for a replica of ``model``
        to start (scaled to zero), before it opens (`api._loading` tells the client).
        """
        accepted_at = time.perf_counter() if accepted_at is None else accepted_at
        key = None if not conversation_id else (owner, conversation_id)
        if model == AUTO_MODEL:
            await self.usage.admit(owner)
            decision = await self.decide(messages, key, categories)
            decision, request, batches = await self.open_routed(
                decision, sampling, accepted_at, key, on_loading
            )
            self.remember_route(key, decision)
            answer = Answer(request, batches, decision)
            self.usage.meter(answer, owner)
            return answer
        request = self.generation_request(self.resolve(model), messages, sampling, key)
        return await self.open_request(
            request, owner=owner, accepted_at=accepted_at, on_loading=on_loading
        )

    async def open_request(
        self,
        request: GenerationRequest,
        *,
        owner: str | None = None,
        admitted: bool = False,
        accepted_at: float | None = None,
        on_loading: Callable[[str], object] | None = None,
    ) -> Answer:
        """`open` for a request built (and checked) earlier: sessions check before queueing
        (and check ``owner``'s budget then: ``admitted``)."""
        if not admitted:
            await self.usage.admit(owner)
        batches = await self.open_stream(request, accepted_at=accepted_at, on_loading=on_loading)
        answer = Answer(request, batches)
        self.usage.meter(answer, owner)
        return answer

    def remember_route(self, key: tuple[str | None, str] | None, decision: RoutingDecision) -> None:
        if key is None:
            return
        self.routes[key] = decision.as_previous()
        self.routes.move_to_end(key)
        while len(self.routes) > _ROUTE_MEMORY:
            self.routes.popitem(last=False)

    def _router(self) -> RouterClient:
        if self.router is None:
            raise ModelNotFound(
                "model 'auto' needs routing: this server has no routing configured",
                param="model",
            )
        return self.router

    def check(
        self, model: str | None, messages: list[ChatMessage], sampling: SamplingFields
    ) -> ModelConfig | None:
        """Refuse what `open` would refuse before it routes or opens anything.

        Returns the named (or default) model; ``None`` for ``auto``, whose request is
        checked against the default model (the routed one is checked again by `open`).
        """
        if model == AUTO_MODEL:
            self._router()
            self.generation_request(self.resolve(None), messages, sampling)
            return None
        config = self.resolve(model)
        self.generation_request(config, messages, sampling)
        return config

    async def decide(
        self,
        messages: list[ChatMessage],
        conversation: tuple[str | None, str] | None = None,
        categories: list[str] | None = None,
    ) -> RoutingDecision:
        """Choose a model; with ``categories``, among those categories' routes only.

        ``conversation`` (owner, id) sticks to that conversation's last route.
        """
        router = self._router()
        previous = self.routes.get(conversation) if conversation else None
        started = time.perf_counter()
        if categories is None:
            decision = await router.decide(messages, previous, True)
        else:
            decision = await self.categories.decide(categories, messages, previous)
        self.metrics.routing_duration.observe(time.perf_counter() - started)
        if decision.trace_id is None:
            decision.trace_id = telemetry.trace_id()
        return decision

    async def open_routed(
        self,
        decision: RoutingDecision,
        sampling: SamplingFields,
        accepted_at: float,
        conversation: tuple[str | None, str] | None = None,
        on_loading: Callable[[str], object] | None = None,
    ) -> tuple[RoutingDecision, GenerationRequest, AsyncGenerator[list[Chunk], None]]:
        """Open a stream on the decided model, falling back while none has started."""
        current: RoutingDecision | None = decision
        while True:
            assert current is not None
            model = self.resolve(current.model)
            request = self.generation_request(model, current.messages, sampling, conversation)
            try:
                batches = await self.open_stream(
                    request, accepted_at=accepted_at, on_loading=on_loading
                )
            except EngineError as exc:
                following = current.next_fallback()
                if following is None:
                    raise
                logger.warning(
                    "model %s failed before its first token (%s); falling back to %s",
                    current.model,
                    exc.code,
                    following.model,
                )
                self.metrics.fallbacks.labels(current.model, following.model).inc()
                current = following
                continue
            self.metrics.routing_decisions.labels(
                current.category or "none", current.model, current.reason
            ).inc()
            if current.reason == "unclassified":
                self.metrics.unclassified.inc()
            if current.compression is not None and not current.compression.skipped:
                self.metrics.compression_ratio.observe(current.compression.ratio)
            return current, request, batches

    def resolve(self, name: str | None) -> ModelConfig:
        model = self.config.model(name or self.config.default_model_name)
        if model is None:
            served = ", ".join(m.name for m in self.config.models)
            raise ModelNotFound(
                f"model {name!r} is not served here (served: {served})", param="model"
            )
        return model

    def generation_request(
        self,
        model: ModelConfig,
        messages: list[ChatMessage],
        sampling: SamplingFields,
        conversation: tuple[str | None, str] | None = None,
    ) -> GenerationRequest:
        """``conversation`` (owner, id) keys its replica affinity (`affinity_key`)."""
        return generation_request(
            model, messages, sampling, self.config.server.max_messages, conversation
        )

    async def open_stream(
        self,
        request: GenerationRequest,
        *,
        accepted_at: float | None = None,
        on_loading: Callable[[str], object] | None = None,
    ) -> AsyncGenerator[list[Chunk], None]:
        """Start generating; errors before the first token raise here, not mid-stream.

        The returned iterator replays the first batch, records metrics, and stops
        the engine when it is closed early.
        """
        model = request.model
        m = self.metrics
        started = accepted_at if accepted_at is not None else time.perf_counter()
        if not request.trace_context:
            # The engine's span joins this request's trace, in whichever process it runs.
            request.trace_context = telemetry.inject()
        source = self.drain.interruptible(self.engines[model].batches(request))
        m.active_streams.labels(model).inc()
        try:
            first = await anext(source)
            while isinstance(first, ModelLoading):  # a replica starts: say so, wait on
                if on_loading is not None:
                    on_loading(model)
                first = await anext(source)
        except StopAsyncIteration:
            first = []
        except BaseException:
            m.active_streams.labels(model).dec()
            m.generations.labels(model, "error").inc()
            await source.aclose()
            raise
        m.time_to_first_token.labels(model).observe(time.perf_counter() - started)
        return self._instrumented(model, first, source)

    async def _instrumented(
        self, model: str, first: list[Chunk], source: AsyncGenerator[list[Chunk], None]
    ) -> AsyncGenerator[list[Chunk], None]:
        m = self.metrics
        finish = "cancelled"
        last = time.perf_counter()
        try:
            batch: list[Chunk] | None = first
            while batch is not None:
                tokens = sum(c.tokens for c in batch)
                now = time.perf_counter()
                if batch is not first and tokens:
                    m.inter_token_latency.labels(model).observe((now - last) / tokens)
                last = now
                if tokens:
                    m.tokens.labels(model, "output").inc(tokens)
                for chunk in batch:
                    if chunk.usage is not None:
                        m.tokens.labels(model, "input").inc(chunk.usage.prompt_tokens)
                    if chunk.finish_reason is not None:
                        finish = chunk.finish_reason
                yield batch
                try:
                    batch = await anext(source)
                except StopAsyncIteration:
                    batch = None
        except ChatfleetError:
            finish = "error"
            raise
        finally:
            m.active_streams.labels(model).dec()
            m.generations.labels(model, finish).inc()
            await source.aclose()

    def error_event(self, exc: BaseException) -> dict[str, Any]:
        err = exc if isinstance(exc, ChatfleetError) else ChatfleetError("generation failed")
        if not isinstance(exc, ChatfleetError):
            logger.exception("stream failed", exc_info=exc)
        self.metrics.errors.labels(err.code).inc()
        return error_body(err.message, type_=err.error_type, code=err.code, param=err.param)
