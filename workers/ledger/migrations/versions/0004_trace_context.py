"""Observability: the trace context (W3C ``traceparent`` and the correlation id) kept with each
event and run, and when a run's alert resolved.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from workers.ledger.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``alert_events.trace_context`` and ``runs.trace_context`` (JSON, nullable: rows
    recorded before have none, and their spans start traces of their own), and
    ``runs.resolved_at``."""
    for table in ("alert_events", "runs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("trace_context", sa.JSON(), nullable=True))
            if table == "runs":
                batch.add_column(sa.Column("resolved_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    """Back to 0003."""
    for table in ("runs", "alert_events"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("trace_context")
            if table == "runs":
                batch.drop_column("resolved_at")
