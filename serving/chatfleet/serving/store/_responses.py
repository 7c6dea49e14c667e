"""Responses API answers, each a turn of a stored conversation owned by one client.

A response built on another (``previous_response_id``) continues that one's
conversation; its prompt is that response's chain of turns (`StoredResponse.context`),
not every message of the conversation, so two responses built on the same one are
two branches that never see each other.

A response's own input is the part of its chain after the last earlier reply: replies
are the chain's assistant messages with a ``model`` (an input message has none, an
assistant message replayed in ``input`` included). Deleting a response deletes its row
and the messages no other response of the conversation has in its chain: a response
built on it keeps its whole context (as OpenAI keeps it), and the last response of a
conversation takes the conversation with it (unless it holds other messages).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from chatfleet.serving.errors import Conflict, NotFound
from chatfleet.serving.store._conversations import ConversationStore, NewMessage, _message
from chatfleet.serving.store._models import ConversationRow, MessageRow, ResponseRow
from chatfleet.serving.store._records import StoredMessage, StoredResponse

#: Message ids a response keeps as its context: far more than any history limit.
_MAX_CONTEXT = 2_000


def _response(row: ResponseRow) -> StoredResponse:
    return StoredResponse(
        id=row.id,
        owner=row.owner,
        conversation_id=row.conversation_id,
        message_id=row.message_id,
        context=list(row.context),
        body=row.body,
        created_at=row.created_at,
    )


class ResponseStore(ConversationStore):
    async def add_response_turn(
        self,
        response_id: str,
        messages: Sequence[NewMessage],
        *,
        owner: str,
        previous: StoredResponse | None,
        conversation_id: str,
        title: str | None = None,
        model: str | None = None,
    ) -> StoredMessage:
        """One turn and the response that answers it, all of it or nothing.

        Without ``previous``, the conversation ``conversation_id`` is created for
        ``owner``; with it, the turn goes into ``previous``'s conversation. Returns the
        reply, empty and ``partial`` (to fill as the answer streams).
        """
        create = previous is None
        try:
            async with self._tx() as s:
                rows, reply = await self._turn_rows(
                    s,
                    conversation_id,
                    messages,
                    create_for=owner if create else None,
                    title=title,
                    conversation_model=model,
                    model=model,
                    error=None,
                )
                earlier = previous.context if previous is not None else []
                context = [*earlier, *(r.id for r in rows), reply.id][-_MAX_CONTEXT:]
                s.add(
                    ResponseRow(
                        id=response_id,
                        owner=owner,
                        conversation_id=conversation_id,
                        message_id=reply.id,
                        context=context,
                    )
                )
                await s.flush()
                return _message(reply)
        except IntegrityError as exc:
            if create:
                raise Conflict(f"conversation {conversation_id!r} already exists") from exc
            raise NotFound(f"conversation {conversation_id!r} not found") from exc  # deleted

    async def finish_response(self, response_id: str, body: dict[str, Any]) -> None:
        """Store the Response object as it was answered."""
        async with self._tx() as s:
            result = await s.execute(
                update(ResponseRow).where(ResponseRow.id == response_id).values(body=body)
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"response {response_id!r} not found")

    async def get_response(
        self, response_id: str, *, owner: str | None = None
    ) -> StoredResponse | None:
        """The response, if it exists and ``owner`` (when given) owns it."""
        query = select(ResponseRow).where(ResponseRow.id == response_id)
        if owner is not None:
            query = query.where(ResponseRow.owner == owner)
        async with self._tx() as s:
            row = await s.scalar(query)
            return None if row is None else _response(row)

    async def response_history(
        self, response: StoredResponse, limit: int | None = None
    ) -> list[StoredMessage]:
        """The last ``limit`` messages of ``response``'s chain worth prepending to a prompt
        (as `history` picks them), oldest first."""
        limit = limit or self.config.history_limit
        said = or_(MessageRow.content != "", MessageRow.tool_calls.is_not(None))
        query = (
            select(MessageRow)
            .where(
                MessageRow.conversation_id == response.conversation_id,
                MessageRow.id.in_(response.context),
                said,
            )
            .order_by(MessageRow.id.desc())
            .limit(limit)
        )
        async with self._tx() as s:
            rows = (await s.scalars(query)).all()
        return [_message(row) for row in reversed(rows)]

    async def response_reply(self, response: StoredResponse) -> StoredMessage | None:
        """The reply ``response`` answered with (``partial`` while it is being written)."""
        async with self._tx() as s:
            row = await s.get(MessageRow, response.message_id)
            return None if row is None else _message(row)

    async def response_inputs(self, response: StoredResponse) -> list[StoredMessage]:
        """The messages ``response`` was asked with (its own turn's), oldest first."""
        in_chain = (
            MessageRow.conversation_id == response.conversation_id,
            MessageRow.id.in_(response.context),
            MessageRow.id < response.message_id,
        )
        async with self._tx() as s:
            last_reply = await s.scalar(
                select(func.max(MessageRow.id)).where(
                    *in_chain, MessageRow.role == "assistant", MessageRow.model.is_not(None)
                )
            )
            query = select(MessageRow).where(*in_chain).order_by(MessageRow.id)
            if last_reply is not None:
                query = query.where(MessageRow.id > last_reply)
            rows = (await s.scalars(query)).all()
        return [_message(row) for row in rows]

    async def delete_response(self, response_id: str, *, owner: str | None = None) -> bool:
        """Delete a response of ``owner`` and what no other response's chain holds;
        ``False`` if there was none."""
        query = select(ResponseRow).where(ResponseRow.id == response_id)
        if owner is not None:
            query = query.where(ResponseRow.owner == owner)
        async with self._tx() as s:
            row = await s.scalar(query)
            if row is None:
                return False
            conversation_id = row.conversation_id
            await s.delete(row)
            others = (
                await s.scalars(
                    select(ResponseRow.context).where(
                        ResponseRow.conversation_id == conversation_id
                    )
                )
            ).all()
            kept = {message_id for context in others for message_id in context}
            alone = [m for m in row.context if m not in kept]
            if alone:
                await s.execute(
                    delete(MessageRow).where(
                        MessageRow.conversation_id == conversation_id, MessageRow.id.in_(alone)
                    )
                )
            left = await s.scalar(
                select(func.count()).where(MessageRow.conversation_id == conversation_id)
            )
            if not others and not left:  # nothing else can reach the conversation
                await s.execute(
                    delete(ConversationRow).where(ConversationRow.id == conversation_id)
                )
            return True
