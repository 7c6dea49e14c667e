"""What passes between transformers' generation thread and the event loop.

The thread reports `Prompt`, `Piece` and `Done` events (or an exception) through a
`Job`, which hands them to the stream's queue with ``call_soon_threadsafe``; the
`PieceStreamer` decodes new tokens incrementally in the thread and matches stop
strings there; `StopWhenSet` ends a generation after the current token once the
consumer has gone; `Sampler` is temperature and top-p with the request's seed;
`LogprobRecorder` keeps each step's log-probabilities for the streamer to report.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from chatfleet.serving.engines._logprobs import reported
from chatfleet.serving.protocol import FinishReason, TokenLogprob

# -- what the generation thread reports ---------------------------------------------


@dataclass(slots=True, frozen=True)
class Prompt:
    tokens: int
    starts_in_thinking: bool


@dataclass(slots=True, frozen=True)
class Piece:
    text: str
    tokens: int
    #: The tokens' logprobs, when the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(slots=True, frozen=True)
class Done:
    finish_reason: FinishReason
    tokens: int


Event = Prompt | Piece | Done | BaseException


class Job:
    """The link between one stream (event loop) and its generation thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event]) -> None:
        self.loop = loop
        self.events = events
        #: Set by the event loop to end the generation after the current token.
        self.stop = threading.Event()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stop.set()


class PieceStreamer(BaseStreamer):
    """Incremental detokenizer called by ``generate`` with every new token.

    Decodes a small window of recent tokens and emits only text that is final:
    nothing while the window ends in an incomplete UTF-8 sequence, and nothing
    that could still become one of the stop strings. On a stop string it
    emits the text before it and sets the job's stop flag.
    """

    def __init__(
        self,
        tokenizer: Any,
        job: Job,
        *,
        context: list[int],
        eos_ids: frozenset[int],
        stop_strings: Sequence[str],
        logprobs: LogprobRecorder | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.unsent_logprobs: list[TokenLogprob] = []
        self.job = job
        self.eos_ids = eos_ids
        self.stop_strings = [s for s in stop_strings if s]
        self.ids = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.prompt_seen = False
        self.generated = 0
        self.unsent_tokens = 0
        self.held = ""  # decoded text that might be the start of a stop string
        self.hit_eos = False
        self.hit_stop = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first echoes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.generated += 1
            self.unsent_tokens += 1
            if self.hit_stop:
                continue
            if token in self.eos_ids:
                self.hit_eos = True
                continue
            if self.logprobs is not None:
                self.unsent_logprobs.append(self.logprobs.of(token, self.tokenizer))
            self.ids.append(token)
            self._accept(self._decode_new())

    def end(self) -> None:
        """Called by ``generate`` when it returns; `flush` does the work."""

    def flush(self) -> None:
        if not self.hit_stop:
            tail = self.tokenizer.decode(self.ids[self.read_offset :], skip_special_tokens=True)
            self._send(self.held + tail.rstrip("\ufffd"), final=True)
            self.held = ""

    def _decode_new(self) -> str:
        decode = self.tokenizer.decode
        before: str = decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        after: str = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # no complete character yet
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def _accept(self, text: str) -> None:
        if not self.stop_strings:
            self._send(text)
            return
        text = self.held + text
        hits = [at for s in self.stop_strings if (at := text.find(s)) >= 0]
        if hits:
            self.hit_stop = True
            self.job.stop.set()
            self.held = ""
            self._send(text[: min(hits)])
            return
        keep = max(partial_suffix(text, s) for s in self.stop_strings)
        self.held = text[len(text) - keep :] if keep else ""
        self._send(text[: len(text) - keep])

    def _send(self, text: str, *, final: bool = False) -> None:
        # The last piece may have no text (the answer ended inside a character): it
        # still carries its tokens' logprobs.
        if text or (final and self.unsent_logprobs):
            self.job.emit(Piece(text, self.unsent_tokens, tuple(self.unsent_logprobs)))
            self.unsent_tokens = 0
            self.unsent_logprobs = []


def partial_suffix(text: str, target: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``target``."""
    for n in range(min(len(target) - 1, len(text)), 0, -1):
        if text.endswith(target[:n]):
            return n
    return 0


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-probabilities of the step being decoded; changes nothing.

    First in the list of processors, it sees the model's raw logits, before
    repetition penalty, temperature or top-p: the logprobs OpenAI (and vLLM, by
    default) report. The streamer reads them back with `of` when the step's token
    comes out, in the same thread, before the next step.
    """

    def __init__(self, top: int) -> None:
        self.top = top
        self.step: Any = None
        self.ranked: list[tuple[int, float]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.step = torch.log_softmax(scores[0].float(), dim=-1)
        if self.top:
            values, ids = self.step.topk(self.top)
            self.ranked = list(zip(ids.tolist(), values.tolist(), strict=True))
        return scores

    def of(self, token: int, tokenizer: Any) -> TokenLogprob:
        """The logprobs of ``token``, just chosen at the recorded step."""
        top = tuple(TokenLogprob(tokenizer.decode([t]), reported(lp)) for t, lp in self.ranked)
        chosen = reported(float(self.step[token]))
        return TokenLogprob(tokenizer.decode([token]), chosen, top=top)


class StopWhenSet(StoppingCriteria):
    """Ends generation once ``flag`` is set (consumer gone, or a stop string)."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return torch.full(
            (input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device
        )


class Sampler(LogitsProcessor):
    """Temperature + nucleus sampling from a per-request generator.

    ``generate`` samples from torch's global RNG, which concurrent requests
    share; this processor draws the token itself (generate then runs greedy
    over a one-hot score), so a request's ``seed`` reproduces its answer.
    """

    def __init__(self, temperature: float, top_p: float, seed: int | None, device: str) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True, dim=-1)
            probs = ordered.softmax(dim=-1)
            # Drop a token when the more likely ones already cover top_p (keep the first).
            drop = probs.cumsum(dim=-1) - probs >= self.top_p
            drop[..., 0] = False
            ordered = ordered.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
        chosen = torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter(-1, chosen, 0.0)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
