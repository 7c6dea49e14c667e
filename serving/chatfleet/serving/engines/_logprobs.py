"""Engines' token logprobs in the one shape chunks carry (`TokenLogprob`).

Each engine reports them its own way: a remote OpenAI-compatible server in OpenAI's
shape (client objects), Ollama in the same shape as plain JSON on each line, vLLM as
a dict per position of token id -> (logprob, rank, decoded text), and transformers
as the logits of each step (`_hf_streaming.LogprobRecorder`). The conversions here
are pure, so they are tested without vLLM or a server.

JSON has no infinity: a token the model rules out entirely (logprob -inf, as a
masked logit gives) is reported at `FLOOR`, as vLLM's OpenAI server does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from chatfleet.serving.protocol import TokenLogprob

__all__ = ["FLOOR", "from_json", "from_openai", "from_vllm", "reported"]

FLOOR = -9999.0


def reported(logprob: float) -> float:
    """``logprob`` as JSON can carry it (-inf and NaN become `FLOOR`)."""
    return logprob if math.isfinite(logprob) else FLOOR


def from_openai(content: Iterable[Any] | None) -> tuple[TokenLogprob, ...]:
    """OpenAI's ``choices[].logprobs.content`` (the client's objects) as chunks carry it."""
    return tuple(
        TokenLogprob(
            entry.token,
            reported(entry.logprob),
            _bytes(entry.token, entry.bytes),
            tuple(
                TokenLogprob(t.token, reported(t.logprob), _bytes(t.token, t.bytes))
                for t in entry.top_logprobs or ()
            ),
        )
        for entry in content or ()
    )


def from_json(entries: object) -> tuple[TokenLogprob, ...]:
    """Logprobs as JSON (``[{token, logprob, bytes?, top_logprobs?}]``, Ollama's); a
    `ValueError` for anything else."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ValueError("logprobs is not a list")
    return tuple(_json_entry(e, nested=True) for e in entries)


def _json_entry(entry: object, *, nested: bool) -> TokenLogprob:
    if not isinstance(entry, dict):
        raise ValueError("a logprob is not an object")
    token, logprob, raw = entry.get("token"), entry.get("logprob"), entry.get("bytes")
    top = entry.get("top_logprobs") or [] if nested else []
    if (
        not isinstance(token, str)
        or isinstance(logprob, bool)
        or not isinstance(logprob, int | float)
        or not (raw is None or (isinstance(raw, list) and all(_is_byte(b) for b in raw)))
        or not isinstance(top, list)
    ):
        raise ValueError("a logprob is malformed")
    alternatives = tuple(_json_entry(t, nested=False) for t in top)
    return TokenLogprob(token, reported(float(logprob)), _bytes(token, raw), alternatives)


def _is_byte(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255


def _bytes(token: str, raw: Sequence[int] | None) -> tuple[int, ...] | None:
    # Kept only where they say more than the token's text (a token cut in a character).
    if raw is None or list(raw) == list(token.encode("utf-8")):
        return None
    return tuple(raw)


def from_vllm(
    token_ids: Sequence[int],
    positions: Sequence[Mapping[int, Any]] | None,
    top: int,
    decode: Callable[[int], str],
) -> tuple[TokenLogprob, ...]:
    """vLLM's ``CompletionOutput.logprobs`` for the sampled ``token_ids``.

    Each position maps token ids to vLLM's ``Logprob`` (``logprob``, ``rank``,
    ``decoded_token``): the sampled token and the ``top`` most likely (which may
    include it). Ranks order the alternatives; a token vLLM did not decode is decoded
    with the tokenizer (``decode``), as vLLM's own OpenAI server does.
    """
    out = []
    for token_id, position in zip(token_ids, positions or (), strict=False):
        chosen = position.get(token_id)
        if chosen is None:  # vLLM always reports the sampled token; nothing to say
            continue
        ranked = sorted(
            (item for item in position.items() if item[1].rank is not None),
            key=lambda item: item[1].rank,
        )
        alternatives = tuple(_vllm_entry(tid, lp, decode) for tid, lp in ranked[:top])
        first = _vllm_entry(token_id, chosen, decode)
        out.append(TokenLogprob(first.token, first.logprob, top=alternatives))
    return tuple(out)


def _vllm_entry(token_id: int, logprob: Any, decode: Callable[[int], str]) -> TokenLogprob:
    text = logprob.decoded_token if logprob.decoded_token is not None else decode(token_id)
    return TokenLogprob(text, reported(logprob.logprob))
