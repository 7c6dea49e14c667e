"""Owners: every conversation, session and log entry belongs to a client; revocations
are found by time (open WebSockets learn of those made through other replicas).

Rows from before are given to the ``local`` client (`LOCAL_OWNER`: the client
``chatfleet serve`` registers); admins see them whatever their owner. To give them
to another client: ``UPDATE conversations SET owner = '<client id>'`` (and
``sessions``, ``logs``) after this migration.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chatfleet.serving.store._records import LOCAL_OWNER

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("conversations", "sessions", "logs")


def upgrade() -> None:
    for table in _TABLES:
        # The default fills the rows there are; dropped after, so that a row written
        # without an owner is refused rather than quietly given to `local`.
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("owner", sa.String(200), nullable=False, server_default=LOCAL_OWNER)
            )
        with op.batch_alter_table(table) as batch:
            batch.alter_column("owner", server_default=None)
            batch.create_index(op.f(f"ix_{table}_owner"), ["owner"], unique=False)
    op.create_index(
        op.f("ix_revoked_tokens_revoked_at"), "revoked_tokens", ["revoked_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_revoked_tokens_revoked_at"), table_name="revoked_tokens")
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(op.f(f"ix_{table}_owner"))
            batch.drop_column("owner")
