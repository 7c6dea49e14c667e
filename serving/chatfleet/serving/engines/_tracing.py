"""The generation span: one per engine stream, with the GenAI semantic conventions.

The span is started, not made current, and ended by hand: the stream is an async
generator that `coalesce` advances from other tasks, where attaching a context
would be detached in the wrong one. No span per token; one event on the first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer

from chatfleet.serving import telemetry
from chatfleet.serving.protocol import Chunk, GenerationRequest


def traced_generation(
    source: AsyncGenerator[Chunk, None], request: GenerationRequest, system: str, tracer: Tracer
) -> AsyncGenerator[Chunk, None]:
    """``source``'s chunks inside a ``chat {model}`` span parented on the request.

    With a no-op tracer (no exporter), ``source`` itself: no extra generator layer,
    and no span built to find that out.
    """
    if not telemetry.records(tracer):
        return source
    span = tracer.start_span(
        f"chat {request.model}",
        context=telemetry.extract(request.trace_context),
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.system": system,
            "gen_ai.request.model": request.model,
            "gen_ai.request.max_tokens": request.max_tokens,
            "gen_ai.request.temperature": request.temperature,
            "gen_ai.request.top_p": request.top_p,
            "chatfleet.request_id": request.request_id,
        },
    )
    if not span.is_recording():
        span.end()
        return source
    return _traced(source, span)


async def _traced(source: AsyncGenerator[Chunk, None], span: Span) -> AsyncGenerator[Chunk, None]:
    output_tokens = 0
    finish: str | None = None
    try:
        async for chunk in source:
            if output_tokens == 0 and chunk.tokens:
                span.add_event("gen_ai.first_token")
            output_tokens += chunk.tokens
            if chunk.usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", chunk.usage.prompt_tokens)
                output_tokens = max(output_tokens, chunk.usage.completion_tokens)
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
            yield chunk
        if finish == "error":
            span.set_status(StatusCode.ERROR, "the engine finished with an error")
    except (GeneratorExit, asyncio.CancelledError):
        # The client went away: not a failure of the engine.
        finish = "cancelled"
        span.set_attribute("chatfleet.cancelled", True)
        span.add_event("cancelled", {"gen_ai.usage.output_tokens": output_tokens})
        raise
    except BaseException as exc:
        finish = "error"
        telemetry.record_error(span, exc)
        raise
    finally:
        span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", [finish or "stop"])
        span.end()
        await source.aclose()
