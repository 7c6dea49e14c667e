"""`Store`: conversations, responses, sessions, logs, revoked tokens and usage, typed and async."""

from __future__ import annotations

import logging

from chatfleet.serving.store._events import EventStore
from chatfleet.serving.store._logs import LogStore
from chatfleet.serving.store._replicas import ReplicaStore
from chatfleet.serving.store._responses import ResponseStore
from chatfleet.serving.store._sessions import SessionStore
from chatfleet.serving.store._tokens import TokenStore
from chatfleet.serving.store._usage import UsageStore

logger = logging.getLogger(__name__)


class Store(
    ResponseStore, SessionStore, EventStore, LogStore, TokenStore, UsageStore, ReplicaStore
):
    """The ingress's database: SQLite by default, PostgreSQL in a cluster.

    Build it from a `StoreConfig`, ``await start()`` (migrates when
    ``migrate_on_start``), use it, ``await close()``. Methods return frozen
    records (`Conversation`, `StoredMessage`, `Session`, `LogEntry`); ``get_*``
    return ``None`` for unknown ids, updates raise `NotFound`. A database that
    can't be reached raises `StoreUnavailable`.

    Every conversation, session and log entry has an ``owner`` (the client id, a
    token's ``sub``): writes name it, reads filter by it (``owner=None``: everyone's,
    what admins see), so another client's id is simply not found.

    The store is one replica (``replica_id``): the sessions it creates and the replies
    it begins are recorded as that replica's, and `start` takes the replica's lease
    (`heartbeat` keeps it; `recover` marks ``interrupted`` what lapsed replicas left).
    """

    async def start(self) -> None:
        """Connect, migrate when the config says so, and forget expired revocations."""
        if self.started:
            return
        await super().start()
        await self.heartbeat()
        try:
            purged = await self.purge_expired()
        except Exception:  # housekeeping only: never a reason not to start
            logger.warning("could not purge expired token revocations", exc_info=True)
        else:
            if purged:
                logger.info("purged %d expired token revocations", purged)
