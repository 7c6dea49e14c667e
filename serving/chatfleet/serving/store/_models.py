"""The tables (SQLAlchemy 2 declarative). The migrations create exactly these.

Timestamps are stored in UTC and always come back timezone-aware, on SQLite
(which has no timezone type) as on PostgreSQL. Text is stored alike on both: NUL
(which PostgreSQL refuses and SQLite keeps) and lone surrogates (which neither can
encode) become U+FFFD, in what is written and in what is looked up. The API refuses
them in what clients send; this is for the rest (an engine's answer, an id in a path).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so later migrations can alter them on both databases.
_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: give a timezone-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def storable(value: str) -> str:
    """``value`` as every backend stores it: NUL and lone surrogates become U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", value)


class StorableString(TypeDecorator[str]):
    """A bounded string (``StorableString(64)``) stored alike on every backend (`storable`)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else storable(value)


class StorableText(StorableString):
    """Text stored alike on every backend (`storable`)."""

    impl = Text
    cache_ok = True


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_NAMING)


class ConversationRow(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(StorableString(64), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(StorableString(200), index=True)
    title: Mapped[str | None] = mapped_column(StorableString(200))
    model: Mapped[str | None] = mapped_column(StorableString(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_conversation_id_id", "conversation_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        StorableString(64), ForeignKey("conversations.id", ondelete="CASCADE")
    )
    role: Mapped[str] = mapped_column(StorableString(16))
    content: Mapped[str] = mapped_column(StorableText, default="")
    thinking: Mapped[str | None] = mapped_column(StorableText)
    status: Mapped[str] = mapped_column(StorableString(16), default="complete")
    model: Mapped[str | None] = mapped_column(StorableString(100))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(StorableText)
    #: An assistant's tool calls, as OpenAI shows them ([{id, type, function}]).
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    #: The call a ``tool`` message answers.
    tool_call_id: Mapped[str | None] = mapped_column(StorableString(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The replica writing a ``partial`` reply: when its lease lapses, the reply is
    # marked ``interrupted`` (recovery).
    replica: Mapped[str | None] = mapped_column(StorableString(64), index=True)


class ResponseRow(Base):
    """A Responses API answer (``resp_...``): the conversation turn it is, for
    ``previous_response_id`` and ``GET /v1/responses/{id}``."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(StorableString(64), primary_key=True)
    owner: Mapped[str] = mapped_column(StorableString(200), index=True)
    conversation_id: Mapped[str] = mapped_column(
        StorableString(64), ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    #: The assistant's reply in the conversation.
    message_id: Mapped[int] = mapped_column(Integer)
    #: The messages (ids, oldest first) a response built on this one starts from: this
    #: response's chain of turns, not the whole conversation (two responses may build
    #: on the same one, each its own branch).
    context: Mapped[list[int]] = mapped_column(JSON)
    #: The Response object as it was answered; null while it is being written.
    body: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(StorableString(64), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(StorableString(200), index=True)
    status: Mapped[str] = mapped_column(StorableString(16), default="pending", index=True)
    message: Mapped[str] = mapped_column(StorableText)
    thinking: Mapped[str] = mapped_column(StorableText, default="")
    response: Mapped[str] = mapped_column(StorableText, default="")
    model: Mapped[str | None] = mapped_column(StorableString(100))
    error: Mapped[str | None] = mapped_column(StorableText)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The replica running it; a session whose replica's lease lapses is ``interrupted``.
    replica: Mapped[str | None] = mapped_column(StorableString(64), index=True)


class ReplicaRow(Base):
    """A live ingress replica: its lease lasts until ``heartbeat_at`` plus the lease time."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(StorableString(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class SessionEventRow(Base):
    """One ``/ws`` event of a session, as sent (``frame``), numbered per session (``seq``).

    ``id`` orders every event of every session: other replicas follow the table by it.
    """

    __tablename__ = "session_events"
    __table_args__ = (
        UniqueConstraint("session_id", "seq", name="uq_session_events_session_id_seq"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(StorableString(64))
    seq: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str] = mapped_column(StorableString(200))
    replica: Mapped[str | None] = mapped_column(StorableString(64))
    type: Mapped[str] = mapped_column(StorableString(64))
    frame: Mapped[str] = mapped_column(StorableText)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class LogRow(Base):
    __tablename__ = "logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(StorableString(200), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    level: Mapped[str] = mapped_column(StorableString(16), default="info")
    event: Mapped[str] = mapped_column(StorableString(100), index=True)
    conversation_id: Mapped[str | None] = mapped_column(StorableString(64), index=True)
    session_id: Mapped[str | None] = mapped_column(StorableString(64), index=True)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RevokedTokenRow(Base):
    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(StorableString(200), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class UsageRow(Base):
    """What a client used of a model on a day (UTC): one row, added to as it goes."""

    __tablename__ = "usage"

    owner: Mapped[str] = mapped_column(StorableString(200), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True, index=True)
    model: Mapped[str] = mapped_column(StorableString(100), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class RequestWindowRow(Base):
    """A client's requests in one minute (UTC), for budgets that hold across replicas."""

    __tablename__ = "request_windows"

    owner: Mapped[str] = mapped_column(StorableString(200), primary_key=True)
    minute: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)


def _store_alike(_target: Any, value: Any, _old: Any, _initiator: Any) -> Any:
    return storable(value) if isinstance(value, str) else value


def _hold_what_is_stored() -> None:
    """A row object holds what its row holds: its text columns run `storable` when set.

    The bind step alone would leave a record handed back by a write (``create_session``)
    different from the same record read back later.
    """
    for mapper in Base.registry.mappers:
        for column in mapper.column_attrs:
            if isinstance(column.columns[0].type, StorableString):
                event.listen(column.class_attribute, "set", _store_alike, retval=True)


_hold_what_is_stored()
