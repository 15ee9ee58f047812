"""Guards: waiting runs with a due time (grace periods), cooldown and budget slots, and the
pause switch's history, and circuit breakers' states.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from workers.ledger.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``runs.not_before`` (indexed with the status), the slot columns, ``pauses`` and
    ``breakers``."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("not_before", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("guard_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("slot_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("verify_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("verdict", sa.String(16), nullable=True))
        batch.add_column(sa.Column("repeat", sa.Integer(), nullable=False, server_default="0"))
        batch.create_index("ix_runs_waiting", ["status", "not_before"])
        batch.create_index("ix_runs_slot_at", ["slot_at"])
        batch.create_index("ix_runs_verify_at", ["verify_at"])
    op.create_table(
        "pauses",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "breakers",
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("remediation", sa.String(100), nullable=False),
        sa.Column("target", sa.String(500), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("opened_at", UTCDateTime(), nullable=True),
        sa.Column("cool_down_s", sa.Float(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    """Back to 0002 (the pause history is dropped; waiting runs stay in their status)."""
    op.drop_table("breakers")
    op.drop_table("pauses")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_verify_at")
        batch.drop_index("ix_runs_slot_at")
        batch.drop_index("ix_runs_waiting")
        batch.drop_column("repeat")
        batch.drop_column("verdict")
        batch.drop_column("verify_at")
        batch.drop_column("slot_at")
        batch.drop_column("guard_key")
        batch.drop_column("not_before")
