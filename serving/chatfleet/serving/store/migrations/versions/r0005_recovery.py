"""Recovery and events: replicas with leases, the replica running each session and
writing each partial reply, and every session event numbered per session.

Sessions and replies in progress from before have no replica: the first replica to
start after this migration marks them ``interrupted`` (nothing is running them).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chatfleet.serving.store._models import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replicas")),
    )
    op.create_index(op.f("ix_replicas_heartbeat_at"), "replicas", ["heartbeat_at"], unique=False)
    op.create_table(
        "session_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("replica", sa.String(64), nullable=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("frame", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_session_events")),
        sa.UniqueConstraint("session_id", "seq", name="uq_session_events_session_id_seq"),
    )
    op.create_index(
        op.f("ix_session_events_created_at"), "session_events", ["created_at"], unique=False
    )
    for table in ("sessions", "messages"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("replica", sa.String(64), nullable=True))
            batch.create_index(op.f(f"ix_{table}_replica"), ["replica"], unique=False)


def downgrade() -> None:
    for table in ("sessions", "messages"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(op.f(f"ix_{table}_replica"))
            batch.drop_column("replica")
    op.drop_index(op.f("ix_session_events_created_at"), table_name="session_events")
    op.drop_table("session_events")
    op.drop_index(op.f("ix_replicas_heartbeat_at"), table_name="replicas")
    op.drop_table("replicas")
