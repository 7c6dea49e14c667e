"""Replicas and their leases; recovery of what a replica that is gone left in progress.

Each `Store` is one replica (``replica_id``): `heartbeat` renews its lease, and
`recover` marks ``interrupted`` every session still pending or running, and every
reply still ``partial``, whose replica holds no lease (gone, or from before
replicas were recorded). A live replica's work is never touched: with several
replicas, each recovers the others' only once their lease has lapsed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, insert, or_, select, update

from chatfleet.serving.config import StoreConfig
from chatfleet.serving.store._database import Database
from chatfleet.serving.store._models import MessageRow, ReplicaRow, SessionRow, utcnow
from chatfleet.serving.store._records import FINISHED_SESSION_STATUSES

#: What a recovered session's or reply's ``error`` says.
GONE = "interrupted: the replica running it stopped before it finished"
REPLY_GONE = "incomplete: the replica writing this reply stopped before it finished"


@dataclass(frozen=True, slots=True)
class Recovered:
    """What one `recover` marked ``interrupted``: sessions (id, owner) and replies."""

    sessions: list[tuple[str, str]]
    messages: int


class ReplicaStore(Database):
    def __init__(
        self, config: StoreConfig | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(config, environ=environ)
        self.replica_id = uuid.uuid4().hex

    async def heartbeat(self) -> None:
        """Take or renew this replica's lease."""
        now = utcnow()
        async with self._tx() as s:
            result = await s.execute(
                update(ReplicaRow).where(ReplicaRow.id == self.replica_id).values(heartbeat_at=now)
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                await s.execute(
                    insert(ReplicaRow).values(id=self.replica_id, started_at=now, heartbeat_at=now)
                )

    async def leave(self) -> None:
        """Give up this replica's lease (a clean shutdown, its work already settled)."""
        async with self._tx() as s:
            await s.execute(delete(ReplicaRow).where(ReplicaRow.id == self.replica_id))

    async def live_replicas(self, lease_s: float) -> list[str]:
        since = utcnow() - timedelta(seconds=lease_s)
        async with self._tx() as s:
            found = await s.scalars(select(ReplicaRow.id).where(ReplicaRow.heartbeat_at >= since))
            return sorted(found.all())

    async def recover(self, lease_s: float) -> Recovered:
        """Mark ``interrupted`` what replicas whose lease lapsed ``lease_s`` ago left running."""
        now = utcnow()
        since = now - timedelta(seconds=lease_s)
        live = select(ReplicaRow.id).where(ReplicaRow.heartbeat_at >= since).scalar_subquery()

        def orphaned(column: Any) -> ColumnElement[bool]:
            return or_(column.is_(None), column.not_in(live))

        async with self._tx() as s:
            sessions = (
                await s.execute(
                    update(SessionRow)
                    .where(
                        SessionRow.status.not_in(FINISHED_SESSION_STATUSES),
                        orphaned(SessionRow.replica),
                    )
                    .values(status="interrupted", error=GONE, finished_at=now, updated_at=now)
                    .returning(SessionRow.id, SessionRow.owner)
                )
            ).all()
            messages = await s.execute(
                update(MessageRow)
                .where(MessageRow.status == "partial", orphaned(MessageRow.replica))
                .values(status="interrupted", error=REPLY_GONE, updated_at=now)
            )
            # Their work is settled: forget them (a replica that comes back re-registers).
            await s.execute(delete(ReplicaRow).where(ReplicaRow.heartbeat_at < since))
        return Recovered(
            sessions=[(row.id, row.owner) for row in sessions],
            messages=messages.rowcount,  # type: ignore[attr-defined]
        )
