"""An `Answer` in the wire formats handlers send: OpenAI's chat completion (whole or
streamed) and chatfleet's native SSE; the headers that explain a routed answer."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Iterable
from json.encoder import encode_basestring_ascii as json_string
from typing import Any

from chatfleet.serving.api._answers import Answer
from chatfleet.serving.api._gateway import ROUTE_HEADER, Gateway
from chatfleet.serving.api._streaming import Closing, sse
from chatfleet.serving.errors import ShuttingDown
from chatfleet.serving.protocol import TokenLogprob, ToolCall, ToolCallDelta


def route_headers(answer: Answer) -> dict[str, str]:
    """The response headers that explain a routed answer (none for a named model)."""
    return {} if answer.decision is None else {ROUTE_HEADER: answer.decision.header()}


def openai_completion(answer: Answer, completion_id: str) -> dict[str, Any]:
    """A collected answer in OpenAI's non-streamed shape."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.thinking:
        message["reasoning_content"] = answer.reasoning
    if answer.calls:
        # As OpenAI's: a message of tool calls has no content (null, not "").
        message["content"] = answer.content or None
        message["tool_calls"] = [tool_call_dict(c) for c in answer.tool_calls]
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": answer.finish}
    if answer.request.logprobs is not None:
        choice["logprobs"] = {"content": logprobs_content(answer.logprobs), "refusal": None}
    completion = {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [choice],
        "usage": answer.usage_dict(),
    }
    if answer.route is not None:
        completion["chatfleet_route"] = answer.route
    return completion


def logprobs_content(logprobs: Iterable[TokenLogprob]) -> list[dict[str, Any]]:
    """Tokens' logprobs as OpenAI's ``choices[].logprobs.content``."""
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": lp.utf8(),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": t.utf8()} for t in lp.top
            ],
        }
        for lp in logprobs
    ]


def tool_call_dict(call: ToolCall) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.id, "type": "function", "function": function}


def tool_call_from_dict(call: dict[str, Any]) -> ToolCall:
    """A call as `tool_call_dict` wrote it (and the store keeps it)."""
    function = call["function"]
    return ToolCall(id=call["id"], name=function["name"], arguments=function["arguments"])


def tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    """A piece of a tool call as OpenAI streams it: the first names the call."""
    if piece.id is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    function = {"name": piece.name, "arguments": piece.arguments}
    return {"index": piece.index, "id": piece.id, "type": "function", "function": function}


async def openai_events(
    gw: Gateway, answer: Answer, completion_id: str, include_usage: bool
) -> AsyncGenerator[str, None]:
    """An answer as OpenAI's stream of ``chat.completion.chunk`` events."""
    created = int(time.time())
    head = (
        f'{{"id":"{completion_id}","object":"chat.completion.chunk",'
        f'"created":{created},"model":{json.dumps(answer.model)},"choices":'
    )

    def event(choices: str, extra: str = "") -> str:
        return f"data: {head}{choices}{extra}}}\n\n"

    # The opening events go out with the first batch's (it is already here: the answer
    # opened on it), and the closing ones with [DONE]: a batch's events go out as one
    # body message. The same bytes, but every message costs the ingress CPU in each
    # ASGI layer and Serve's send path (one message per token cost about a third of
    # the ingress's CPU per request), and a burst of new requests waits on that CPU.
    events: list[str] = []
    if answer.route is not None:
        # The route first, in a chunk with no choices (as OpenAI's usage chunk):
        # clients that don't know the field skip it.
        events.append(event("[]", f',"chatfleet_route":{json.dumps(answer.route)}'))
    events.append(
        event('[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]')
    )
    try:
        async for delta in answer.deltas():
            for chunk in delta.chunks:
                if chunk.call is not None:
                    text = json.dumps({"tool_calls": [tool_call_delta(chunk.call)]})
                    events.append(event(f'[{{"index":0,"delta":{text},"finish_reason":null}}]'))
                elif chunk.logprobs and chunk.kind == "text":
                    # Tokens a detokenizer held back come with the text after them, or
                    # with none (an end token's): an empty content carries them then.
                    text = f'{{"content": {json_string(chunk.text)}}}'
                    logprobs = json.dumps({"content": logprobs_content(chunk.logprobs)})
                    events.append(
                        event(
                            f'[{{"index":0,"delta":{text},"logprobs":{logprobs},'
                            '"finish_reason":null}]'
                        )
                    )
                elif chunk.text:
                    key = "reasoning_content" if chunk.kind == "thinking" else "content"
                    # The bytes json.dumps({key: text}) writes, without a dict and an
                    # encoder pass per token (json_string is the C function it ends in).
                    text = f'{{"{key}": {json_string(chunk.text)}}}'
                    events.append(event(f'[{{"index":0,"delta":{text},"finish_reason":null}}]'))
            if events:
                yield "".join(events)
                events = []
        events.append(event(f'[{{"index":0,"delta":{{}},"finish_reason":"{answer.finish}"}}]'))
        if include_usage:
            events.append(event("[]", f',"usage":{json.dumps(answer.usage_dict())}'))
    except Exception as exc:
        # OpenAI's own streams report late failures as an event with an "error" key.
        events.append(sse(gw.error_event(exc)))
    finally:
        await answer.aclose()
    events.append("data: [DONE]\n\n")
    yield Closing("".join(events))


async def generate_events(
    gw: Gateway, answer: Answer, request_id: str, *, metadata: bool = True
) -> AsyncGenerator[str, None]:
    """An answer as chatfleet's native SSE: metadata, thinking/text chunks, end_stream."""
    finish: str | None = None
    # One body message per batch, the opening event with the first, as in openai_events.
    events: list[str] = []
    if metadata:
        events.append(sse({"model": answer.model, "request_id": request_id}, "metadata"))
    try:
        async for delta in answer.deltas():
            for chunk in delta.chunks:
                if chunk.text:
                    kind = "thinking_chunk" if chunk.kind == "thinking" else "text_chunk"
                    # sse({"text": ...}, kind)'s bytes, at a tenth of its CPU per token.
                    events.append(f'event: {kind}\ndata: {{"text":{json_string(chunk.text)}}}\n\n')
            if events:
                yield "".join(events)
                events = []
    except Exception as exc:
        events.append(sse(gw.error_event(exc), "error"))
        finish = "interrupted" if isinstance(exc, ShuttingDown) else "error"
    finally:
        await answer.aclose()
    end = {"finish_reason": finish or answer.finish, "usage": answer.usage_dict()}
    events.append(sse(end, "end_stream"))
    yield Closing("".join(events))
