"""Background sessions and their live events: ``/api/sessions``, ``WS /ws``, ``GET /ws/sessions``.

A session is one message answered in the background: ``POST /api/sessions`` (or
``POST /api/alerts``, the dashboard PoC's name for it) stores it (``pending``) and
starts an asyncio task owned by the app, so the generation goes on when the client
goes away. At most ``max_concurrent`` run at once; the others wait (still
``pending``). Every subscriber of ``WS /ws`` gets, in order (``data`` shown)::

    connected {message, subscriber_id, sessions}
    session.created {<the session>}
    llm.thinking {content: <piece>, is_complete: false}...
    llm.thinking {content: <all the reasoning>, is_complete: true}
    llm.response {content: <piece>, is_complete: false, is_final: false}...
    llm.response {content: <the whole answer>, is_complete, is_final: true}
    session.completed | session.failed | session.cancelled | session.interrupted
        {<the session>, usage?}

Every event is ``{type, session_id, seq, data, ts}`` (``connected``, ``ping``,
``pong`` and ``error`` have no ``session_id`` nor ``seq``); ``seq`` numbers a
session's events from 1, the number to resume after. Each also carries chatfleet's first, flat
shape beside ``data``, which the dashboard reads: ``session`` (the record) on the
``session.*`` events; ``delta`` (the piece) or ``content`` (the whole text, on the
closing event), ``is_complete`` and ``is_final`` on the ``llm.*`` ones; ``error``,
``usage`` on the finishing ones; ``subscriber_id``, ``sessions`` on ``connected``.

Reasoning goes only in ``llm.thinking`` and the answer only in ``llm.response``.
A session belongs to the client that started it: other clients neither find it
(404) nor get its events; admins see every session (`chatfleet.serving.api._tenancy`).
The hub and the socket are in `chatfleet.serving.api._events`.

A session runs in the replica that accepted it; its events are stored and reach
every replica's subscribers (`chatfleet.serving.api._event_log`), and a client
that reconnects resumes with ``GET /api/sessions/{id}/events?after=N`` or a
``resume`` frame on ``/ws`` (`chatfleet.serving.api._resume`). A session whose
replica stops is ``interrupted``: at shutdown by the replica itself ("shutting
down"), after a crash by another replica once the lease lapses
(`chatfleet.serving.api._recovery`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ConfigDict, Field

from chatfleet.serving.api._answers import Answer, BackgroundWrites, best_effort, require_store
from chatfleet.serving.api._event_log import EventLog
from chatfleet.serving.api._events import Event, EventHub
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._recovery import Lease
from chatfleet.serving.api._schemas import SamplingFields
from chatfleet.serving.api._tenancy import Caller
from chatfleet.serving.errors import ChatfleetError, Conflict, NotFound, Overloaded, ShuttingDown
from chatfleet.serving.protocol import GenerationRequest, Message
from chatfleet.serving.store import Session, SessionStatus, Store

logger = logging.getLogger(__name__)

#: The error of a session this replica stopped because it is shutting down.
SHUTTING_DOWN = "interrupted: the server is shutting down"


class SessionRequest(SamplingFields):
    """`POST /api/sessions` and `POST /api/alerts`; other fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    message: str = Field(min_length=1, description="The user message to answer in the background.")
    model: str | None = Field(None, description="Model name; empty means the default model.")
    system: str | None = Field(None, description="An optional system prompt.")

    def to_messages(self) -> list[Message]:
        out = [Message(role="system", content=self.system)] if self.system else []
        return [*out, Message(role="user", content=self.message)]


class SessionRunner:
    """Runs sessions as background tasks of this replica, and cancels them."""

    def __init__(
        self,
        gw: Gateway,
        hub: EventHub,
        *,
        max_concurrent: int = 8,
        max_waiting: int = 256,
    ) -> None:
        self.gw = gw
        self.hub = hub
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.running = 0
        self.writes = BackgroundWrites()
        self.log = EventLog(lambda: gw.store, hub, on_followed=self._followed)
        self.lease: Lease | None = None
        self._closing = False

    async def start(self) -> None:
        """Follow other replicas' events, take this replica's lease, recover the lapsed."""
        store = self.gw.store
        if store is None:
            return
        settings = store.config
        await self.log.start(settings.events_flush_s, settings.events_poll_s)
        self.lease = Lease(store, self.log, settings)
        await self.lease.start()

    def _followed(self, event: Event) -> None:
        """Another replica cancelled a session running here: stop it."""
        if event.type == "session.cancelled" and event.session_id is not None:
            task = self._tasks.get(event.session_id)
            if task is not None:
                task.cancel()

    @property
    def store(self) -> Store:
        return require_store(self.gw.store)

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def create(self, body: SessionRequest, owner: str) -> Session:
        store = self.store
        if len(self._tasks) >= self.max_concurrent + self.max_waiting:
            raise Overloaded("too many sessions in progress on this server; retry later")
        model = self.gw.resolve(body.model)
        request = self.gw.generation_request(model, body.to_messages(), body)
        await self.gw.usage.admit(owner)  # over budget: refused now, not failed later
        session = await store.create_session(body.message, owner=owner, model=model.name)
        self._publish_session("session.created", session)
        task = asyncio.create_task(self._run(session, request), name=f"session-{session.id}")
        self._tasks[session.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(session.id, None))
        return session

    async def _run(self, session: Session, request: GenerationRequest) -> None:
        store = self.store
        session_id, owner = session.id, session.owner
        answer = Answer.unopened(request)  # until the engine has started
        status: SessionStatus = "cancelled"
        error: str | None = None
        thinking_open = False
        started = False
        try:
            async with self._slots:
                self.running += 1
                started = True
                await store.update_session(session_id, status="running")
                answer = await self.gw.open_request(
                    request,
                    owner=owner,
                    admitted=True,
                    # Subscribers learn at once why the first token is late.
                    on_loading=lambda model: self.log.emit(
                        "llm.loading", owner=owner, session_id=session_id, model=model
                    ),
                )
                async for delta in answer.deltas():
                    if delta.thinking:
                        thinking_open = True
                        self.log.emit(
                            "llm.thinking",
                            {"content": delta.thinking, "is_complete": False},
                            owner=owner,
                            session_id=session_id,
                            delta=delta.thinking,
                            is_complete=False,
                        )
                    if delta.text:
                        if thinking_open:
                            thinking_open = False
                            self._thinking_done(session, answer)
                        self.log.emit(
                            "llm.response",
                            {"content": delta.text, "is_complete": False, "is_final": False},
                            owner=owner,
                            session_id=session_id,
                            delta=delta.text,
                            is_complete=False,
                            is_final=False,
                        )
                    if answer.checkpoint_due():
                        await best_effort(
                            lambda: store.update_session(
                                session_id, thinking=answer.reasoning, response=answer.content
                            ),
                            "checkpoint of a session",
                        )
            status = "completed"
        except asyncio.CancelledError:
            status = "interrupted" if self._closing else "cancelled"
            error = SHUTTING_DOWN if self._closing else None
            raise
        except ShuttingDown:
            # The drain's grace period ended with the session still running.
            status, error = "interrupted", SHUTTING_DOWN
        except ChatfleetError as exc:
            status, error = "failed", exc.message
            self.gw.metrics.errors.labels(exc.code).inc()
        except Exception:
            logger.exception("session %s failed", session_id)
            status, error = "failed", "generation failed"
        finally:
            if started:
                self.running -= 1
            if thinking_open and status == "completed":
                self._thinking_done(session, answer)
            await self._finish(session, status, error, answer)

    def _thinking_done(self, session: Session, answer: Answer) -> None:
        self.log.emit(
            "llm.thinking",
            owner=session.owner,
            session_id=session.id,
            content=answer.reasoning,
            is_complete=True,
        )

    async def _finish(
        self, session: Session, status: SessionStatus, error: str | None, answer: Answer
    ) -> None:
        session_id = session.id
        self.log.emit(
            "llm.response",
            owner=session.owner,
            session_id=session_id,
            content=answer.content,
            is_complete=status == "completed",
            is_final=True,
        )
        usage = answer.final_usage()
        record: Session | None = None
        finished_here = True
        try:
            record = await self.writes.settle(
                self.store.finish_session(
                    session_id,
                    status,
                    thinking=answer.reasoning,
                    response=answer.content,
                    error=error,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                )
            )
        except Conflict:
            # Finished elsewhere meanwhile (cancelled through another replica, or taken
            # for dead): that replica told the subscribers.
            record = await self.store.get_session(session_id)
            status = record.status if record is not None else status
            finished_here = False
        except Exception:
            logger.exception("could not store the end of session %s", session_id)
        if finished_here:
            self._publish_session(
                f"session.{status}", record or session, error=error, usage=answer.usage_dict()
            )
        else:
            self.log.forget(session_id)
        await self.log.flush()  # a finished session's events are stored at once
        await best_effort(
            lambda: self.store.add_log(
                f"session.{status}",
                owner=session.owner,
                level="info" if status == "completed" else "warning",
                session_id=session_id,
                data={"error": error, "completion_tokens": usage.completion_tokens},
            ),
            "log of a finished session",
        )

    async def cancel(self, session_id: str, caller: Caller) -> Session:
        """Stop a session of ``caller``'s; `Conflict` if it had finished, `NotFound` if
        it never existed or is another client's."""
        store = self.store
        found = await store.get_session(session_id, owner=caller.sees)
        if found is None:
            raise NotFound(f"session {session_id!r} not found")
        task = self._tasks.get(session_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
            found = await store.get_session(session_id)
            assert found is not None
            return found
        if found.finished:
            raise Conflict(f"session {session_id!r} already {found.status}")
        # Not running here: another replica's (which then stops storing it), or one
        # orphaned by a replica that died.
        record = await store.finish_session(
            session_id, "cancelled", error="cancelled; it was not running on this replica"
        )
        # Stored as the session's next event: its replica (if alive) sees it and stops.
        data = record.to_dict()
        await self.log.emit_stored(
            "session.cancelled", data, owner=record.owner, session_id=session_id, session=data
        )
        return record

    def _publish_session(self, type_: str, session: Session, **more: Any) -> None:
        """A ``session.*`` event: its ``data`` is the session (plus ``more``)."""
        record = session.to_dict()
        self.log.emit(
            type_,
            {**record, **more},
            owner=session.owner,
            session_id=session.id,
            session=record,
            **more,
        )

    async def close(self) -> None:
        """Stop every session of this replica (stored as ``interrupted``, "shutting
        down"), store their events, drop subscribers."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.writes.drain()
        if self.lease is not None:
            await self.lease.close()
        await self.log.close()
        self.hub.close_all()
