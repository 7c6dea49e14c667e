"""Choosing a model for a prompt: classify, look up the route, stick, compress.

The router returns a `RoutingDecision`; it never forwards the generation (the
ingress streams straight from the chosen engine). It is pure logic over two
async callables, so it runs the same in one process and behind Ray handles.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from opentelemetry.trace import SpanKind

from chatfleet.serving import telemetry
from chatfleet.serving.config import AppConfig, RoutingConfig
from chatfleet.serving.protocol import Classification, Compression, Message

__all__ = ["PreviousRoute", "Router", "RoutingDecision"]

RouteReason = Literal["route", "unclassified", "unrouted_category", "sticky", "fallback"]
"""Why a model was chosen. ``unclassified``: the best category scored below
``routing.confidence_threshold``, so the prompt fits no category well enough to route
on and the default model answers it (on purpose; counted apart in the metrics)."""

#: How many of the decided category's nearest examples an explanation shows.
_EXPLAINED_EXAMPLES = 3
#: Examples are cut to this length in the one-line header.
_HEADER_EXAMPLE_CHARS = 80

ClassifyFn = Callable[[str], Awaitable[Classification]]
CompressFn = Callable[[str, str], Awaitable[Compression]]


@dataclass(slots=True, frozen=True)
class PreviousRoute:
    """Where a conversation's previous turn went."""

    model: str
    category: str | None
    confidence: float


@dataclass(slots=True)
class RoutingDecision:
    """Which model answers, why, and what to send it."""

    model: str
    category: str | None
    confidence: float
    reason: RouteReason
    fallbacks: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    #: The nearest examples (text, cosine) of the best category, when it has examples.
    nearest: list[tuple[str, float]] = field(default_factory=list)
    compression: Compression | None = None
    messages: list[Message] = field(default_factory=list)
    failed_models: list[str] = field(default_factory=list)
    trace_id: str | None = None

    def explain(self) -> dict[str, Any]:
        """The decision as clients see it (header, first event, metadata)."""
        out: dict[str, Any] = {
            "model": self.model,
            "category": self.category,
            "confidence": round(self.confidence, 4),
            "reason": self.reason,
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
            "fallbacks": self.fallbacks,
        }
        if self.nearest:
            out["nearest"] = [
                {"example": text, "similarity": round(similarity, 4)}
                for text, similarity in self.nearest[:_EXPLAINED_EXAMPLES]
            ]
        if self.failed_models:
            out["failed_models"] = self.failed_models
        if self.trace_id is not None:
            out["trace_id"] = self.trace_id
        if self.compression is not None:
            c = self.compression
            out["compression"] = {
                "original_tokens": c.original_tokens,
                "compressed_tokens": c.compressed_tokens,
                "ratio": round(c.ratio, 4),
                "skipped": c.skipped,
            }
        return out

    def header(self) -> str:
        """A compact one-line form for the ``x-chatfleet-route`` header."""
        info = self.explain()
        info.pop("scores")
        if self.nearest:  # the one example that decided most, kept short
            text, similarity = self.nearest[0]
            info["nearest"] = {
                "example": text[:_HEADER_EXAMPLE_CHARS],
                "similarity": round(similarity, 4),
            }
        # ASCII escapes (json's default) keep examples in any language a valid header.
        return json.dumps(info, separators=(",", ":"))

    def as_previous(self) -> PreviousRoute:
        return PreviousRoute(self.model, self.category, self.confidence)

    def next_fallback(self) -> RoutingDecision | None:
        """The decision to try when this model failed before its first token."""
        if not self.fallbacks:
            return None
        return replace(
            self,
            model=self.fallbacks[0],
            fallbacks=self.fallbacks[1:],
            reason="fallback",
            failed_models=[*self.failed_models, self.model],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dedupe(models: list[str], exclude: str) -> list[str]:
    out: list[str] = []
    for m in models:
        if m != exclude and m not in out:
            out.append(m)
    return out


def split_question(text: str) -> tuple[str, str]:
    """Split a long prompt into (context, question): the last paragraph is the question."""
    head, sep, tail = text.rstrip().rpartition("\n\n")
    if not sep or not tail.strip():
        return "", text
    return head, tail


class Router:
    """Routes prompts by category with a confidence floor, hysteresis and fallbacks."""

    def __init__(
        self,
        config: AppConfig,
        classify: ClassifyFn,
        compress: CompressFn | None = None,
        *,
        tracer_provider: telemetry.TracerProvider | None = None,
    ) -> None:
        if config.routing is None:
            raise ValueError("the app config has no routing section")
        self.config = config
        self.routing: RoutingConfig = config.routing
        self._classify = classify
        self._compress = compress
        self._routes = {r.category: r for r in self.routing.routes}
        self.default_model = self.routing.default_model or config.default_model_name
        self._tracer = telemetry.get_tracer(tracer_provider)

    def rankings(self) -> dict[str, Any]:
        """For each category, the models in the order they would be tried."""
        assert self.config.classifier is not None
        out = []
        for category in self.config.classifier.categories:
            route = self._routes.get(category.name)
            primary = route.model if route else self.default_model
            chain = [primary, *(route.fallbacks if route else []), *self.routing.fallbacks]
            out.append({"category": category.name, "models": [primary, *_dedupe(chain, primary)]})
        return {
            "default_model": self.default_model,
            "confidence_threshold": self.routing.confidence_threshold,
            "rankings": out,
        }

    async def decide(
        self,
        messages: list[Message],
        previous: PreviousRoute | None = None,
        compress: bool = True,
    ) -> RoutingDecision:
        with self._tracer.start_as_current_span("router.decide") as span:
            prompt = next((m.content for m in reversed(messages) if m.role == "user"), "")
            with self._tracer.start_as_current_span(
                "classifier.classify", kind=SpanKind.CLIENT
            ) as classify_span:
                classification = await self._classify(prompt)
                category, confidence = classification.top
                classify_span.set_attribute("chatfleet.category", category)
                classify_span.set_attribute("chatfleet.confidence", confidence)
            decision = self._choose(classification, previous)
            decision.messages = list(messages)
            if compress and self.routing.compress and self._compress is not None:
                decision.messages, decision.compression = await self._compressed(messages)
            decision.trace_id = telemetry.trace_id(span)
            span.set_attribute("chatfleet.route.model", decision.model)
            span.set_attribute("chatfleet.route.reason", decision.reason)
            if decision.category is not None:
                span.set_attribute("chatfleet.route.category", decision.category)
            return decision

    def _choose(
        self, classification: Classification, previous: PreviousRoute | None
    ) -> RoutingDecision:
        routing = self.routing
        category, confidence = classification.top
        scores = dict(zip(classification.labels, classification.scores, strict=True))
        nearest = list(classification.nearest.get(category, []))
        route = self._routes.get(category)
        reason: RouteReason
        own_fallbacks: list[str]
        chosen: str | None = category
        if confidence < routing.confidence_threshold:
            model, reason, own_fallbacks = self.default_model, "unclassified", []
            chosen, nearest = None, []
        elif route is None:
            model, reason, own_fallbacks = self.default_model, "unrouted_category", []
        else:
            model, reason, own_fallbacks = route.model, "route", route.fallbacks
        if (
            previous is not None
            and previous.model != model
            and self.config.model(previous.model) is not None
        ):
            # Hysteresis: switching models mid-conversation costs coherence (and a
            # cold KV cache); do it only when the new category wins clearly.
            held = classification.score(previous.category) if previous.category else 0.0
            if confidence - held < routing.hysteresis_margin:
                kept = self._routes.get(previous.category or "")
                return RoutingDecision(
                    model=previous.model,
                    category=previous.category,
                    confidence=held,
                    reason="sticky",
                    fallbacks=_dedupe(
                        [*(kept.fallbacks if kept else []), *routing.fallbacks, model],
                        previous.model,
                    ),
                    scores=scores,
                    nearest=list(classification.nearest.get(previous.category or "", [])),
                )
        return RoutingDecision(
            model=model,
            category=chosen,
            confidence=confidence,
            reason=reason,
            fallbacks=_dedupe([*own_fallbacks, *routing.fallbacks], model),
            scores=scores,
            nearest=nearest,
        )

    async def _compressed(
        self, messages: list[Message]
    ) -> tuple[list[Message], Compression | None]:
        """Compress the context, never the final user question."""
        assert self._compress is not None
        if not messages:
            return messages, None
        last = len(messages) - 1
        while last >= 0 and messages[last].role != "user":
            last -= 1
        out = list(messages)
        total_in = total_out = 0
        touched = False
        for i, message in enumerate(messages):
            if i == last:
                context, question = split_question(message.content)
                if not context:
                    continue
            else:
                context, question = message.content, ""
            if not context.strip():
                continue
            with self._tracer.start_as_current_span(
                "compressor.compress", kind=SpanKind.CLIENT
            ) as compress_span:
                result = await self._compress(context, question)
                compress_span.set_attribute(
                    "chatfleet.compression.original_tokens", result.original_tokens
                )
                compress_span.set_attribute(
                    "chatfleet.compression.compressed_tokens", result.compressed_tokens
                )
                compress_span.set_attribute("chatfleet.compression.skipped", result.skipped)
            total_in += result.original_tokens
            total_out += result.compressed_tokens
            if not result.skipped:
                touched = True
                text = result.text
                if i == last and question not in text:
                    text = f"{text}\n\n{question}"
                out[i] = Message(role=message.role, content=text)
        if total_in == 0:
            return messages, None
        return out, Compression(
            text="", original_tokens=total_in, compressed_tokens=total_out, skipped=not touched
        )
