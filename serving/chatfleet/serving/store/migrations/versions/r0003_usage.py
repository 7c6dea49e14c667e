"""Usage: tokens and requests per client, model and day; requests per client and minute.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chatfleet.serving.store._models import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "day", "model", name=op.f("pk_usage")),
    )
    op.create_index(op.f("ix_usage_day"), "usage", ["day"], unique=False)
    op.create_table(
        "request_windows",
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("minute", UTCDateTime(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "minute", name=op.f("pk_request_windows")),
    )


def downgrade() -> None:
    op.drop_table("request_windows")
    op.drop_index(op.f("ix_usage_day"), table_name="usage")
    op.drop_table("usage")
