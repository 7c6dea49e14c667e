"""Messages keep tool calls: an assistant's calls (JSON) and the call a tool message answers.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("tool_calls", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("tool_call_id", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("tool_call_id")
        batch.drop_column("tool_calls")
