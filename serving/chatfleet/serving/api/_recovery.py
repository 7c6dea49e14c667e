"""This replica's lease, and recovery of what replicas that are gone left in progress.

At start-up and every ``store.heartbeat_s``, the replica renews its lease and marks
``interrupted`` the sessions and partial replies of replicas whose lease lapsed
``store.lease_s`` ago (`Store.recover`), telling subscribers with a
``session.interrupted`` event. So a session whose replica died is ``interrupted`` at
most ``lease_s + heartbeat_s`` after it died (20 s by default), as long as one
replica runs; a live replica's sessions are never touched. Old session events are
purged on the way (``store.events_retention_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from chatfleet.serving.api._event_log import EventLog
from chatfleet.serving.config import StoreConfig
from chatfleet.serving.store import Store

logger = logging.getLogger(__name__)

#: Old events are purged at most this often.
_PURGE_EVERY_S = 3600.0


class Lease:
    """Keeps this replica's lease and recovers the others' lapsed work."""

    def __init__(self, store: Store, log: EventLog, config: StoreConfig) -> None:
        self.store = store
        self.log = log
        self.config = config
        self.recovered = 0  # sessions this replica marked interrupted
        self._purged_at = 0.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # At start-up: what was left before this replica started, replies that no
        # replica owns (from before replicas were recorded) included.
        await self.round(unowned=True)
        self._task = asyncio.create_task(self._every(), name="replica-lease")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            await self.round()

    async def round(self, *, unowned: bool = False) -> None:
        try:
            await self.store.heartbeat()
            recovered = await self.store.recover(self.config.lease_s, unowned=unowned)
        except Exception:
            logger.warning("could not renew this replica's lease", exc_info=True)
            return
        if recovered.sessions or recovered.messages:
            logger.warning(
                "marked interrupted what stopped replicas left: %d sessions, %d replies",
                len(recovered.sessions),
                recovered.messages,
            )
        for session_id, owner in recovered.sessions:
            self.recovered += 1
            try:
                session = await self.store.get_session(session_id)
                if session is None:
                    continue
                record = session.to_dict()
                await self.log.emit_stored(
                    "session.interrupted",
                    {**record, "error": session.error},
                    owner=owner,
                    session_id=session_id,
                    session=record,
                    error=session.error,
                )
            except Exception:
                logger.warning("could not tell that session %s was interrupted", session_id)
        if time.monotonic() - self._purged_at > _PURGE_EVERY_S:
            self._purged_at = time.monotonic()
            try:
                await self.store.purge_events(self.config.events_retention_s)
            except Exception:
                logger.warning("could not purge old session events", exc_info=True)
