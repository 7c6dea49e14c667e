"""What crosses the boundary between the ingress and an engine.

Plain slotted dataclasses, not pydantic models: they are pickled for every
message that crosses a Ray handle, and they carry no user-facing validation
(the ingress validates requests before it builds a `GenerationRequest`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Chunk",
    "ChunkKind",
    "FinishReason",
    "GenerationRequest",
    "Message",
    "Role",
    "Usage",
]

Role = Literal["system", "user", "assistant", "tool"]
ChunkKind = Literal["thinking", "text"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(slots=True, frozen=True)
class Message:
    role: Role
    content: str


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
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Chunk:
    """A piece of a streamed answer.

    ``kind`` tells reasoning ("thinking") from the answer ("text"); ``tokens`` is
    how many model tokens the text stands for. The last chunk of a stream has a
    ``finish_reason`` and ``usage`` (its text may be empty).
    """

    kind: ChunkKind
    text: str
    tokens: int = 1
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
