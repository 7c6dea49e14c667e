"""Routing endpoints: classify, compress, select a model and stream, rankings."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from chatfleet.serving.api._answers import Answer
from chatfleet.serving.api._gateway import AUTO_MODEL, Gateway
from chatfleet.serving.api._loading import Held, native_stream, opened_or_held
from chatfleet.serving.api._routing_schemas import ClassifyRequest, CompressRequest, SelectRequest
from chatfleet.serving.api._streaming import EventStream, sse
from chatfleet.serving.api._tenancy import CallerDep
from chatfleet.serving.api._wire import generate_events, route_headers
from chatfleet.serving.errors import NotConfigured


def add_routing_routes(app: FastAPI, gw: Gateway) -> None:
    @app.post(
        "/api/classify",
        tags=["routing"],
        summary="Zero-shot classification of a prompt.",
        description="Scores every label; single-label scores sum to 1. `nearest`: the"
        " example prompts nearest to this one, for the best labels that have examples.",
    )
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        if gw.classifier is None:
            raise NotConfigured("no classifier is configured on this server")
        started = time.perf_counter()
        result = await gw.classifier.classify(
            body.prompt, body.possible_categories, body.descriptions, body.multi_label
        )
        gw.metrics.classifier_duration.observe(time.perf_counter() - started)
        category, confidence = result.top
        return {
            "category": category,
            "confidence": confidence,
            "labels": result.labels,
            "scores": result.scores,
            "multi_label": result.multi_label,
            "nearest": {
                label: [{"example": text, "similarity": sim} for text, sim in examples]
                for label, examples in result.nearest.items()
            },
        }

    @app.post(
        "/api/compress",
        tags=["routing"],
        summary="Compress a text with LLMLingua.",
        description="Texts under the configured token threshold come back unchanged.",
    )
    async def compress(body: CompressRequest) -> dict[str, Any]:
        if gw.compressor is None:
            raise NotConfigured("no compressor is configured on this server")
        started = time.perf_counter()
        result = await gw.compressor.compress(body.text, body.question, body.ratio)
        gw.metrics.compressor_duration.observe(time.perf_counter() - started)
        if not result.skipped:
            gw.metrics.compression_ratio.observe(result.ratio)
        return {
            "compressed_text": result.text,
            "original_tokens": result.original_tokens,
            "compressed_tokens": result.compressed_tokens,
            "ratio": result.ratio,
            "requested_ratio": body.ratio,
            "skipped": result.skipped,
        }

    @app.get(
        "/api/model-rankings",
        tags=["routing"],
        summary="For each category, the models in the order they are tried.",
    )
    async def model_rankings() -> dict[str, Any]:
        if gw.router is None:
            raise NotConfigured("no routing is configured on this server")
        return await gw.router.rankings()

    @app.post(
        "/api/models/select",
        tags=["routing"],
        summary="Route a prompt to a model and stream its answer (SSE).",
        description=(
            "Events: `metadata` {selected_model, category, confidence, reason, scores,"
            " classification {category, confidence, labels, scores}, compression,"
            " fallbacks}; `thinking_chunk` and `text_chunk` {text}; `error`;"
            " `end_stream` {finish_reason, usage}. With `possible_categories`"
            " (`possibleCategories`), the prompt is classified over those categories only"
            " and the best one's route answers."
        ),
    )
    async def select(body: SelectRequest, caller: CallerDep) -> Response:
        opened = await opened_or_held(
            True,
            gw.open,
            AUTO_MODEL,
            body.to_messages(),
            body,
            conversation_id=body.conversation_id,
            owner=caller.client_id,
            categories=body.possible_categories,
            accepted_at=time.perf_counter(),
        )
        if isinstance(opened, Held):  # the routed model starts: a loading event first
            return native_stream(gw, opened, lambda answer: _select_events(gw, answer))
        return EventStream(_select_events(gw, opened), headers=route_headers(opened))


async def _select_events(gw: Gateway, answer: Answer) -> AsyncGenerator[str, None]:
    decision = answer.decision
    assert decision is not None  # opened with model "auto"
    info = decision.explain()
    info["selected_model"] = info.pop("model")
    info["request_id"] = answer.request.request_id
    # The classifier's own verdict, shaped as /api/classify answers (a sticky route's
    # category above may differ from it).
    ranked = sorted(decision.scores.items(), key=lambda item: -item[1])
    if ranked:
        info["classification"] = {
            "category": ranked[0][0],
            "confidence": round(ranked[0][1], 4),
            "labels": [label for label, _ in ranked],
            "scores": [round(score, 4) for _, score in ranked],
        }
    yield sse(info, "metadata")
    events = generate_events(gw, answer, answer.request.request_id, metadata=False)
    async with contextlib.aclosing(events):
        async for event in events:
            yield event
