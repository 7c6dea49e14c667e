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

from sqlalchemy import ColumnElement, delete, insert, or_, select, update

from chatfleet.serving.config import StoreConfig
from chatfleet.serving.store._database import Database
from chatfleet.serving.store._models import MessageRow, ReplicaRow, SessionRow, utcnow

#: What a recovered session's or reply's ``error`` says.
GONE = "interrupted: the replica running it stopped before it finished"
REPLY_GONE = "incomplete: the replica writing this reply stopped before it finished"
IN_PROGRESS = ("pending", "running")


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

    async def recover(self, lease_s: float, *, unowned: bool = False) -> Recovered:
        """Mark ``interrupted`` what replicas whose lease lapsed ``lease_s`` ago left
        running; with ``unowned``, also what no replica owns (from before migration
        0005: done once, at start-up, as it reads every partial reply)."""
        now = utcnow()
        since = now - timedelta(seconds=lease_s)
        live = select(ReplicaRow.id).where(ReplicaRow.heartbeat_at >= since).scalar_subquery()
        async with self._tx() as s:
            dead = list(
                await s.scalars(select(ReplicaRow.id).where(ReplicaRow.heartbeat_at < since))
            )
            sessions = (
                await s.execute(
                    update(SessionRow)
                    .where(
                        SessionRow.status.in_(IN_PROGRESS),
                        or_(SessionRow.replica.is_(None), SessionRow.replica.not_in(live)),
                    )
                    .values(status="interrupted", error=GONE, finished_at=now, updated_at=now)
                    .returning(SessionRow.id, SessionRow.owner)
                )
            ).all()
            # By replica (indexed), not by status: the messages table is the big one.
            owners: list[ColumnElement[bool]] = [MessageRow.replica.in_(dead)] if dead else []
            if unowned:
                owners.append(MessageRow.replica.is_(None))
            messages = 0
            if owners:
                result = await s.execute(
                    update(MessageRow)
                    .where(MessageRow.status == "partial", or_(*owners))
                    .values(status="interrupted", error=REPLY_GONE, updated_at=now)
                )
                messages = result.rowcount  # type: ignore[attr-defined]
            # Their work is settled: forget them (a replica that comes back re-registers).
            if dead:
                await s.execute(delete(ReplicaRow).where(ReplicaRow.id.in_(dead)))
        return Recovered(sessions=[(row.id, row.owner) for row in sessions], messages=messages)
