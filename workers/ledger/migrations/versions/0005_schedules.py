"""Schedules: what beat installed from the config's ``schedules:``, and each one's last tick.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from workers.ledger.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``schedules``."""
    op.create_table(
        "schedules",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("remediation", sa.String(100), nullable=False),
        sa.Column("timetable", sa.String(200), nullable=False),
        sa.Column("stale_after_s", sa.Float(), nullable=False),
        sa.Column("backup", sa.Boolean(), nullable=False),
        sa.Column("since", UTCDateTime(), nullable=False),
        sa.Column("fired_at", UTCDateTime(), nullable=True),
        sa.Column("last_run_id", sa.String(36), nullable=True),
        sa.Column("succeeded_at", UTCDateTime(), nullable=True),
        sa.Column("succeeded_run_id", sa.String(36), nullable=True),
    )


def downgrade() -> None:
    """Back to 0004."""
    op.drop_table("schedules")
