"""A deterministic engine simulator for tests, benchmarks and GPU-less clusters."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import os
from collections.abc import AsyncGenerator, Iterator

from chatfleet.serving.config import FakeEngineConfig, ModelConfig
from chatfleet.serving.engines._base import Engine
from chatfleet.serving.engines._fake_scripts import (
    answer_to_tool_result,
    json_document,
    tool_calls,
)
from chatfleet.serving.errors import EngineError
from chatfleet.serving.protocol import (
    Chunk,
    ChunkKind,
    GenerationRequest,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)

_Step = tuple[ChunkKind, str, ToolCallDelta | None]

_WORDS = (
    "the quick brown fox jumps over a lazy dog while streaming tokens arrive in order and"
    " every answer is made of plain words chosen from this short fixed list so that tests"
    " can predict exactly what a prompt will produce"
).split(" ")


#: The fake's alternatives to a token, in order (distinct words of its list).
_ALTERNATIVES = tuple(dict.fromkeys(_WORDS))
_LN2 = math.log(2)


def fake_logprobs(token: str, top: int) -> TokenLogprob:
    """The made-up logprobs of ``token``: a geometric distribution with the token first.

    The token has probability 1/2 and is the most likely (what greedy decoding picks);
    its alternatives are the fake's words other than it, with 1/4, 1/8, ... So values
    are exact (ln 2 apart) and a client can check what it got without a model.
    """
    space = " " if token.startswith(" ") else ""
    others = (space + w for w in _ALTERNATIVES if space + w != token)
    ranked = [token, *itertools.islice(others, max(0, top - 1))][:top]
    top_logprobs = tuple(TokenLogprob(t, -(i + 1) * _LN2) for i, t in enumerate(ranked))
    return TokenLogprob(token, -_LN2, top=top_logprobs)


def _prompt_tokens(request: GenerationRequest) -> int:
    return sum(len(m.content.split()) + 4 for m in request.messages)


def _spaced(i: int, word: str) -> str:
    return word if i == 0 else " " + word


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence, and whether one was found."""
    at = min((at for s in stop if (at := text.find(s)) >= 0), default=None)
    return (text, False) if at is None else (text[:at], True)


def _pieces(text: str, size: int = 6) -> list[str]:
    """``text`` in token-sized pieces (JSON streams without word boundaries)."""
    return [text[i : i + size] for i in range(0, len(text), size)]


class FakeEngine(Engine):
    """Streams words picked deterministically from the prompt and the seed.

    The same request always gives the same answer; a request's ``seed`` picks other
    words, and its ``stop`` sequences end the answer before the first one (finish
    ``stop``), as real engines honour them. Offered tools, it calls one as
    ``fake.tool_calls`` says, and answers a tool's result with a sentence quoting it;
    asked for JSON (``response_format``), it writes a document the schema accepts
    (`_fake_scripts`). ``tokens_per_second`` paces
    the stream on a schedule, token i due i / tokens_per_second after the first,
    like a GPU that decodes at its own pace: a late wake-up (a busy event loop)
    makes the next tokens come sooner, not the whole stream slower (0: no pacing
    at all). ``fail_after_tokens`` raises an `EngineError` after that many tokens,
    to exercise error paths.
    """

    def __init__(self, model: ModelConfig) -> None:
        super().__init__(model)
        settings = model.fake
        assert settings is not None
        self.settings: FakeEngineConfig = settings
        #: Requests whose generation stopped because the consumer went away.
        self.cancelled: list[str] = []
        self.active = 0

    @property
    def runs_ahead(self) -> bool:
        # Paced, it decodes on its schedule; at full speed, a token is computed when asked.
        return self.settings.tokens_per_second > 0

    def words(self, request: GenerationRequest, count: int, *, offset: int = 0) -> list[str]:
        last = request.messages[-1].content if request.messages else ""
        seed = (
            self.settings.seed if request.seed is None else f"{self.settings.seed}/{request.seed}"
        )
        digest = hashlib.sha256(f"{seed}:{last}".encode()).digest()
        start = int.from_bytes(digest[:4], "big")
        return [_WORDS[(start + offset + i) % len(_WORDS)] for i in range(count)]

    def endless_words(self, request: GenerationRequest, *, offset: int) -> Iterator[str]:
        return (w for i in itertools.count() for w in self.words(request, 1, offset=offset + i))

    def _plan(self, request: GenerationRequest) -> tuple[list[_Step], str]:
        """What to stream (kind, text, tool call piece) and the finish reason."""
        s = self.settings
        thinking = self.words(request, s.thinking_tokens, offset=7)
        plan: list[_Step] = [("thinking", _spaced(i, w), None) for i, w in enumerate(thinking)]
        calls = tool_calls(s.tool_calls, request, self.endless_words(request, offset=13))
        if calls:
            for index, call in enumerate(calls):
                plan.append(("tool_call", "", ToolCallDelta(index, "", call.id, call.name)))
                pieces = _pieces(call.arguments)
                plan += [("tool_call", "", ToolCallDelta(index, p)) for p in pieces]
            return plan, "tool_calls"
        if request.response_format is not None:
            endless = self.endless_words(request, offset=0)
            document, cut = _cut(json_document(request.response_format, endless), request.stop)
            pieces = _pieces(document)
            finish = "stop" if cut or len(pieces) <= request.max_tokens else "length"
            return plan + [("text", p, None) for p in pieces[: request.max_tokens]], finish
        result = answer_to_tool_result(request)
        if result is not None:
            words = result.split()
            finish = "stop" if len(words) <= request.max_tokens else "length"
            words = words[: request.max_tokens]
        else:
            answer = min(s.reply_tokens, request.max_tokens)
            finish = "stop" if s.reply_tokens <= request.max_tokens else "length"
            words = self.words(request, answer)
            if s.report_process:  # each Ray Serve replica is a process of its own
                words = ["pid", str(os.getpid())][: request.max_tokens]
        text, cut = _cut(" ".join(words), request.stop)
        if cut:
            words = text.split()
            finish = "stop"
        plan += [("text", _spaced(i, w), None) for i, w in enumerate(words)]
        return plan, finish

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        s = self.settings
        delay = 1.0 / s.tokens_per_second if s.tokens_per_second > 0 else 0.0
        plan, finish = self._plan(request)
        top = request.logprobs if s.logprobs else None
        self.active += 1
        emitted = 0
        clock = asyncio.get_running_loop().time
        try:
            if s.time_to_first_token_s:
                await asyncio.sleep(s.time_to_first_token_s)
            first = clock()
            i = 0
            while i < len(plan):
                if s.fail_after_tokens is not None and emitted >= s.fail_after_tokens:
                    raise EngineError(f"fake engine failure after {emitted} tokens")
                end = i + 1
                if delay and i:
                    wait = first + i * delay - clock()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    # Every token due by now goes in this chunk: a reader that comes
                    # late gets them together, as vLLM merges the outputs a slow
                    # reader has not taken yet.
                    end = max(end, min(int((clock() - first) / delay) + 1, len(plan)))
                    if s.fail_after_tokens is not None:
                        end = min(end, i + s.fail_after_tokens - emitted)
                elif not delay and i % 64 == 63:
                    await asyncio.sleep(0)  # stay cancellable at full speed
                kind, text, call = plan[i]
                count = 1
                # A tool call's pieces go one by one: each says which call it adds to.
                while i + count < end and plan[i + count][0] == kind and call is None:
                    text += plan[i + count][1]
                    count += 1
                logprobs: tuple[TokenLogprob, ...] = ()
                if kind == "text" and top is not None:
                    logprobs = tuple(fake_logprobs(t, top) for _, t, _ in plan[i : i + count])
                emitted += count
                i += count
                yield Chunk(kind=kind, text=text, tokens=count, call=call, logprobs=logprobs)
            if s.fail_after_tokens is not None and emitted >= s.fail_after_tokens:
                raise EngineError(f"fake engine failure after {emitted} tokens")
            yield Chunk(
                kind="text",
                text="",
                tokens=0,
                finish_reason=finish,  # type: ignore[arg-type]
                usage=Usage(prompt_tokens=_prompt_tokens(request), completion_tokens=emitted),
            )
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled.append(request.request_id)
            raise
        finally:
            self.active -= 1
