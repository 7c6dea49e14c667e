"""What the store hands out: plain frozen records, detached from any database session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

#: ``interrupted``: cut off because the replica writing it stopped (drained at
#: shutdown, or found dead); distinct from ``failed`` (the engine failed) and
#: ``cancelled`` (the client stopped it). Its text so far is kept.
MessageStatus = Literal["complete", "partial", "cancelled", "failed", "interrupted"]
SessionStatus = Literal["pending", "running", "completed", "failed", "cancelled", "interrupted"]
MessageRole = Literal["system", "user", "assistant", "tool"]

MESSAGE_STATUSES: tuple[MessageStatus, ...] = (
    "complete",
    "partial",
    "cancelled",
    "failed",
    "interrupted",
)
SESSION_STATUSES: tuple[SessionStatus, ...] = (
    "pending",
    "running",
    "completed",
    "failed",
    "cancelled",
    "interrupted",
)
#: A session in one of these states is over; it can't be cancelled or restarted.
FINISHED_SESSION_STATUSES: frozenset[SessionStatus] = frozenset(
    {"completed", "failed", "cancelled", "interrupted"}
)


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    owner: str
    title: str | None
    model: str | None
    created_at: datetime
    updated_at: datetime
    message_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "title": self.title,
            "model": self.model,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "message_count": self.message_count,
        }


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message of a conversation. ``status`` is ``partial`` while it is being written."""

    id: int
    conversation_id: str
    role: MessageRole
    content: str
    status: MessageStatus
    created_at: datetime
    updated_at: datetime
    thinking: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    #: An assistant's tool calls ([{id, type, function: {name, arguments}}]).
    tool_calls: list[dict[str, Any]] | None = None
    #: The call a ``tool`` message answers.
    tool_call_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "thinking": self.thinking,
            "status": self.status,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "error": self.error,
            "created_at": self.created_at.isoformat(),
        }
        # Only where they are: older clients see the shape they know.
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


@dataclass(frozen=True, slots=True)
class Session:
    """A background generation: one message in, thinking and a response out."""

    id: str
    owner: str
    status: SessionStatus
    message: str
    thinking: str
    response: str
    model: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_SESSION_STATUSES

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "id": self.id,
            "owner": self.owner,
            "status": self.status,
            "message": self.message,
            "thinking": self.thinking,
            "response": self.response,
            "model": self.model,
            "error": self.error,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class LogEntry:
    id: int
    owner: str
    created_at: datetime
    level: str
    event: str
    conversation_id: str | None
    session_id: str | None
    data: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "created_at": self.created_at.isoformat(),
            "level": self.level,
            "event": self.event,
            "conversation_id": self.conversation_id,
            "session_id": self.session_id,
            "data": self.data,
        }


#: The client that owns what was stored before rows had owners (migration 0002 gives
#: them to it), and everything stored while auth is off: ``chatfleet serve``'s own
#: client is called so too, so a laptop's history stays its user's.
LOCAL_OWNER = "local"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A Responses API answer: a turn of ``conversation_id``, its reply ``message_id``.

    ``context`` is the ids of the messages a response built on this one starts from
    (its chain of turns, this one's included); ``body`` is the Response object as it
    was answered (``None`` while it is being written).
    """

    id: str
    owner: str
    conversation_id: str
    message_id: int
    context: list[int]
    body: dict[str, Any] | None
    created_at: datetime
