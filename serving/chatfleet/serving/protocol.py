"""What crosses the boundary between the ingress and an engine.

Plain slotted dataclasses, not pydantic models: they are pickled for every
message that crosses a Ray handle, and they carry no user-facing validation
(the ingress validates requests before it builds a `GenerationRequest`). A request
crosses to an engine as a `WireRequest`, its JSON encoded once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, NamedTuple

__all__ = [
    "Chunk",
    "ChunkKind",
    "Classification",
    "Compression",
    "FinishReason",
    "GenerationRequest",
    "Message",
    "Role",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "WireRequest",
    "request_from_json",
    "request_to_json",
]

Role = Literal["system", "user", "assistant", "tool"]
ChunkKind = Literal["thinking", "text", "tool_call"]
FinishReason = Literal["stop", "length", "cancelled", "error", "tool_calls"]


@dataclass(slots=True, frozen=True)
class ToolCall:
    """A function call an assistant made: ``arguments`` is a JSON text, as OpenAI's."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True, frozen=True)
class Message:
    role: Role
    content: str
    #: An assistant's calls (its ``content`` may then be empty).
    tool_calls: tuple[ToolCall, ...] = ()
    #: The call a ``tool`` message answers.
    tool_call_id: str | None = None


@dataclass(slots=True)
class GenerationRequest:
    """One generation: the conversation so far and how to sample the answer."""

    model: str
    messages: list[Message]
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    #: Further sampling parameters (``top_k``, ``repetition_penalty``...), only those the
    #: model's engine declares in its capabilities (the ingress refuses the others).
    sampling: dict[str, int | float] = field(default_factory=dict)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Function tools offered, in OpenAI's shape (``{"type": "function", "function":
    #: {...}}``); only for engines whose capabilities say ``tools``.
    tools: list[dict[str, Any]] = field(default_factory=list)
    #: ``auto``, ``none``, ``required`` or ``{"type": "function", "function": {"name"}}``.
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    #: OpenAI's ``response_format`` (``json_object``, ``json_schema``); None for text.
    response_format: dict[str, Any] | None = None
    #: None: no logprobs; k: each answer token's logprob with the k most likely
    #: alternatives (OpenAI's ``logprobs: true`` with ``top_logprobs: k``); only for
    #: engines whose capabilities say ``logprobs``.
    logprobs: int | None = None
    #: The W3C trace context (``traceparent``...) the engine's span is parented on.
    trace_context: dict[str, str] = field(default_factory=dict)
    #: Requests with the same key go to the same replica while it has room, the one
    #: holding their prompt's KV cache (the ingress sets it; empty: any replica).
    affinity_key: str = ""


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True, frozen=True)
class ToolCallDelta:
    """A piece of the ``index``-th tool call: the first piece of a call names it (``id``,
    ``name``), the following ones only add to its ``arguments`` (as OpenAI streams them)."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """A token and its log probability (natural log of the probability the model gave it,
    before temperature and penalties, as OpenAI defines it); ``top`` holds the most likely
    tokens at its position, best first (their own ``top`` is empty)."""

    token: str
    logprob: float
    #: The token's bytes where its text is not their UTF-8 (a token that ends inside a
    #: character); None: ``token.encode()``.
    bytes: tuple[int, ...] | None = None
    top: tuple[TokenLogprob, ...] = ()

    def utf8(self) -> list[int]:
        return list(self.token.encode("utf-8")) if self.bytes is None else list(self.bytes)


@dataclass(slots=True)
class Chunk:
    """A piece of a streamed answer.

    ``kind`` tells reasoning ("thinking") from the answer ("text") and from a piece of
    a tool call ("tool_call", in ``call``; its ``text`` is empty); ``tokens`` is
    how many model tokens the text stands for. The last chunk of a stream has a
    ``finish_reason`` and ``usage`` (its text may be empty). ``logprobs``, when the
    request asked for them, are those of the tokens this chunk adds (the tokens of a
    text may come a chunk before or after the text, as a detokenizer holds them).
    """

    kind: ChunkKind
    text: str
    tokens: int = 1
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    call: ToolCallDelta | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(slots=True, frozen=True)
class Embeddings:
    """Sentence embeddings of some texts, in their order (unit length), and what they cost."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(slots=True, frozen=True)
class Classification:
    """Scores of one prompt for every label, best first."""

    labels: list[str]
    scores: list[float]
    multi_label: bool = False
    #: What decided it: label -> its nearest example prompts with their cosine
    #: similarity, for the best labels that have examples (empty otherwise).
    nearest: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    @property
    def top(self) -> tuple[str, float]:
        return self.labels[0], self.scores[0]

    def score(self, label: str) -> float:
        return self.scores[self.labels.index(label)] if label in self.labels else 0.0


@dataclass(slots=True, frozen=True)
class Compression:
    """The outcome of compressing a text; ``skipped`` when it was left unchanged."""

    text: str
    original_tokens: int
    compressed_tokens: int
    skipped: bool = False

    @property
    def ratio(self) -> float:
        """Achieved ratio: compressed tokens / original tokens (1.0 = unchanged)."""
        return self.compressed_tokens / self.original_tokens if self.original_tokens else 1.0


def request_to_json(request: GenerationRequest) -> dict[str, Any]:
    """``request`` as plain JSON values (what the token relay's link carries; it never
    unpickles from the network), for encoding at once: it shares the request's lists
    and dicts, which ``asdict`` would copy deeply (once per request, on the ingress's
    hot path)."""
    data = {name: getattr(request, name) for name in _REQUEST_FIELDS}
    data["messages"] = [
        {
            "role": m.role,
            "content": m.content,
            "tool_calls": [asdict(call) for call in m.tool_calls],
            "tool_call_id": m.tool_call_id,
        }
        for m in request.messages
    ]
    return data


_REQUEST_FIELDS = tuple(f.name for f in fields(GenerationRequest))


def request_from_json(data: dict[str, Any]) -> GenerationRequest:
    """The `GenerationRequest` `request_to_json` gave ``data`` for."""
    messages = [
        Message(
            m["role"],
            m["content"],
            tuple(ToolCall(**call) for call in m["tool_calls"]),
            m["tool_call_id"],
        )
        for m in data["messages"]
    ]
    return GenerationRequest(**{**data, "messages": messages})


class WireRequest(NamedTuple):
    """A `GenerationRequest` as the ingress sends it to an engine replica: its JSON
    (`request_to_json`), encoded once for both the handle call and the copy sent ahead
    on the token relay's link, and the affinity key the engine's request router reads.

    Pickled for the handle call, a string costs one step of Ray's pickler, where the
    request's dataclasses, lists and dicts cost one (Python-level) step each; decoded
    in the engine only when the copy sent ahead has not started it already.
    """

    text: str
    affinity_key: str = ""

    @classmethod
    def of(cls, request: GenerationRequest) -> WireRequest:
        text = json.dumps(request_to_json(request), separators=(",", ":"))
        return cls(text, request.affinity_key)

    def decode(self) -> GenerationRequest:
        return request_from_json(json.loads(self.text))
