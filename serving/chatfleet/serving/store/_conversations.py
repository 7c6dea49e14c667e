"""Conversations and their messages, each conversation owned by one client.

Reads take ``owner``: only that client's conversations are found (``None``: every
client's, for admins). Messages belong to their conversation: the caller finds the
conversation (with its owner) first, then reads or appends its messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, delete, func, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chatfleet.serving.errors import Conflict, NotFound
from chatfleet.serving.store._database import Database
from chatfleet.serving.store._models import ConversationRow, MessageRow, utcnow
from chatfleet.serving.store._records import (
    MESSAGE_STATUSES,
    Conversation,
    MessageRole,
    MessageStatus,
    StoredMessage,
)

#: A message of a new turn: ``(role, content)``, or with its ``tool_calls`` (OpenAI's
#: shape, or None) and ``tool_call_id``.
NewMessage = (
    tuple[MessageRole, str] | tuple[MessageRole, str, list[dict[str, Any]] | None, str | None]
)


def _conversation(row: ConversationRow, count: int = 0) -> Conversation:
    return Conversation(
        id=row.id,
        owner=row.owner,
        title=row.title,
        model=row.model,
        created_at=row.created_at,
        updated_at=row.updated_at,
        message_count=count,
    )


def _message(row: MessageRow) -> StoredMessage:
    return StoredMessage(
        id=row.id,
        conversation_id=row.conversation_id,
        role=row.role,  # type: ignore[arg-type]
        content=row.content,
        status=row.status,  # type: ignore[arg-type]
        created_at=row.created_at,
        updated_at=row.updated_at,
        thinking=row.thinking,
        model=row.model,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        error=row.error,
        tool_calls=row.tool_calls,
        tool_call_id=row.tool_call_id,
    )


def _owned_by(owner: str | None) -> ColumnElement[bool]:
    return true() if owner is None else ConversationRow.owner == owner


class ConversationStore(Database):
    replica_id: str

    async def create_conversation(
        self, *, owner: str, title: str | None = None, model: str | None = None
    ) -> Conversation:
        async with self._tx() as s:
            row = ConversationRow(owner=owner, title=title[:200] if title else None, model=model)
            s.add(row)
            await s.flush()
            return _conversation(row)

    async def get_conversation(
        self, conversation_id: str, *, owner: str | None = None
    ) -> Conversation | None:
        """The conversation, if it exists and ``owner`` (when given) owns it."""
        query = select(ConversationRow).where(
            ConversationRow.id == conversation_id, _owned_by(owner)
        )
        async with self._tx() as s:
            row = await s.scalar(query)
            if row is None:
                return None
            count = await s.scalar(
                select(func.count())
                .select_from(MessageRow)
                .where(MessageRow.conversation_id == conversation_id)
            )
            return _conversation(row, count or 0)

    async def list_conversations(
        self, *, owner: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[Conversation]:
        """``owner``'s (``None``: everyone's), most recently active first, with message counts."""
        counts = (
            select(MessageRow.conversation_id, func.count().label("n"))
            .group_by(MessageRow.conversation_id)
            .subquery()
        )
        query = (
            select(ConversationRow, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.conversation_id == ConversationRow.id)
            .where(_owned_by(owner))
            .order_by(ConversationRow.updated_at.desc(), ConversationRow.id)
            .limit(limit)
            .offset(offset)
        )
        async with self._tx() as s:
            return [_conversation(row, n) for row, n in (await s.execute(query)).all()]

    async def delete_conversation(self, conversation_id: str, *, owner: str | None = None) -> bool:
        """Delete a conversation of ``owner`` and its messages; ``False`` if there was none."""
        async with self._tx() as s:
            found = await s.scalar(
                select(ConversationRow.id).where(
                    ConversationRow.id == conversation_id, _owned_by(owner)
                )
            )
            if found is None:
                return False
            await s.execute(delete(MessageRow).where(MessageRow.conversation_id == conversation_id))
            result = await s.execute(
                delete(ConversationRow).where(ConversationRow.id == conversation_id)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def messages(self, conversation_id: str) -> list[StoredMessage]:
        """Every message of a conversation, oldest first."""
        query = (
            select(MessageRow)
            .where(MessageRow.conversation_id == conversation_id)
            .order_by(MessageRow.id)
        )
        async with self._tx() as s:
            return [_message(row) for row in (await s.scalars(query)).all()]

    async def history(self, conversation_id: str, limit: int | None = None) -> list[StoredMessage]:
        """The last ``limit`` messages worth prepending to a prompt, oldest first.

        That is every message with text or tool calls, whatever its status: the partial
        answer of a cancelled or failed generation was said, so it stays in the history.
        Empty answers (a failure before the first token) are left out.
        """
        limit = limit or self.config.history_limit
        said = or_(MessageRow.content != "", MessageRow.tool_calls.is_not(None))
        query = (
            select(MessageRow)
            .where(MessageRow.conversation_id == conversation_id, said)
            .order_by(MessageRow.id.desc())
            .limit(limit)
        )
        async with self._tx() as s:
            rows = (await s.scalars(query)).all()
        return [_message(row) for row in reversed(rows)]

    async def append_message(
        self,
        conversation_id: str,
        role: MessageRole,
        content: str,
        *,
        status: MessageStatus = "complete",
        thinking: str | None = None,
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        error: str | None = None,
    ) -> StoredMessage:
        """Add a message, committed when this returns. Raises `NotFound`."""
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        now = utcnow()
        try:
            async with self._tx() as s:
                conversation = await s.get(ConversationRow, conversation_id)
                if conversation is None:
                    raise NotFound(f"conversation {conversation_id!r} not found")
                conversation.updated_at = now
                row = MessageRow(
                    conversation_id=conversation_id,
                    role=role,
                    content=content,
                    thinking=thinking,
                    status=status,
                    model=model,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    error=error,
                    created_at=now,
                    updated_at=now,
                    replica=self.replica_id if status == "partial" else None,
                )
                s.add(row)
                await s.flush()
                return _message(row)
        except IntegrityError as exc:  # deleted meanwhile
            raise NotFound(f"conversation {conversation_id!r} not found") from exc

    async def add_user_message(self, conversation_id: str, content: str) -> StoredMessage:
        return await self.append_message(conversation_id, "user", content)

    async def begin_assistant_message(
        self, conversation_id: str, *, model: str | None = None
    ) -> StoredMessage:
        """An empty assistant message in status ``partial``, to fill as the answer streams."""
        return await self.append_message(
            conversation_id, "assistant", "", status="partial", model=model
        )

    async def add_turn(
        self,
        conversation_id: str,
        messages: Sequence[NewMessage],
        *,
        create_for: str | None = None,
        title: str | None = None,
        conversation_model: str | None = None,
        model: str | None = None,
        error: str | None = None,
    ) -> StoredMessage:
        """One turn, all of it or nothing: the new ``messages``, then the assistant's reply.

        Each new message is ``(role, content)``, or ``(role, content, tool_calls,
        tool_call_id)`` for an assistant's calls and a tool's result.

        The reply is returned: empty and ``partial`` (to fill as the answer streams,
        as `begin_assistant_message`'s), or ``failed`` with ``error`` saying why no
        answer came. With ``create_for`` (an owner), the conversation is created under
        ``conversation_id`` for that owner (with ``title`` and ``conversation_model``);
        otherwise it must exist (`NotFound`).
        """
        try:
            async with self._tx() as s:
                _, reply = await self._turn_rows(
                    s,
                    conversation_id,
                    messages,
                    create_for=create_for,
                    title=title,
                    conversation_model=conversation_model,
                    model=model,
                    error=error,
                )
                return _message(reply)
        except IntegrityError as exc:
            if create_for is not None:
                raise Conflict(f"conversation {conversation_id!r} already exists") from exc
            raise NotFound(f"conversation {conversation_id!r} not found") from exc  # deleted

    async def _turn_rows(
        self,
        s: AsyncSession,
        conversation_id: str,
        messages: Sequence[NewMessage],
        *,
        create_for: str | None,
        title: str | None,
        conversation_model: str | None,
        model: str | None,
        error: str | None,
    ) -> tuple[list[MessageRow], MessageRow]:
        """`add_turn`'s rows, added in the transaction ``s``: the new messages and the reply."""
        now = utcnow()
        if create_for is not None:
            conversation = ConversationRow(
                id=conversation_id,
                owner=create_for,
                title=title[:200] if title else None,
                model=conversation_model,
                created_at=now,
                updated_at=now,
            )
            s.add(conversation)
        else:
            found = await s.get(ConversationRow, conversation_id)
            if found is None:
                raise NotFound(f"conversation {conversation_id!r} not found")
            found.updated_at = now
        rows = [
            MessageRow(
                conversation_id=conversation_id,
                role=role,
                content=content,
                status="complete",
                tool_calls=(tools[0] or None) if tools else None,
                tool_call_id=tools[1] if tools else None,
                created_at=now,
                updated_at=now,
            )
            for role, content, *tools in messages
        ]
        reply = MessageRow(
            conversation_id=conversation_id,
            role="assistant",
            content="",
            status="partial" if error is None else "failed",
            model=model,
            error=error,
            created_at=now,
            updated_at=now,
            replica=self.replica_id if error is None else None,
        )
        for row in [*rows, reply]:
            s.add(row)
            await s.flush()  # one at a time: ids follow the conversation's order
        return rows, reply

    async def update_message(
        self, message_id: int, *, content: str, thinking: str | None = None
    ) -> None:
        """Checkpoint the text of a message being written."""
        async with self._tx() as s:
            result = await s.execute(
                update(MessageRow)
                .where(MessageRow.id == message_id)
                .values(content=content, thinking=thinking or None, updated_at=utcnow())
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"message {message_id} not found")

    async def finish_message(
        self,
        message_id: int,
        *,
        status: MessageStatus,
        content: str,
        thinking: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        error: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> StoredMessage:
        """Store a message's final text, tool calls and status (complete, cancelled or failed)."""
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        async with self._tx() as s:
            row = await s.get(MessageRow, message_id)
            if row is None:
                raise NotFound(f"message {message_id} not found")
            row.status = status
            row.content = content
            row.thinking = thinking or None
            row.prompt_tokens = prompt_tokens
            row.completion_tokens = completion_tokens
            row.error = error
            row.tool_calls = tool_calls or None
            row.updated_at = utcnow()
            await s.flush()
            return _message(row)
