"""Run lifecycle: one dedupe key for every trigger, targets, delivery counts, attempt leases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from workers.ledger.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the lifecycle columns and replace (episode, rule) uniqueness by the dedupe key."""
    with op.batch_alter_table("alert_events") as batch:
        batch.add_column(sa.Column("publishes", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("deliveries", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch.create_index("ix_alert_events_handled_at", ["handled_at"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("dedupe_key", sa.String(512), nullable=True))
        batch.add_column(sa.Column("target", sa.String(500), nullable=True))
        batch.add_column(sa.Column("destructive", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("idempotency_key", sa.String(200), nullable=True))
        batch.add_column(sa.Column("parent_run_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("step", sa.String(200), nullable=True))
        batch.add_column(sa.Column("publishes", sa.Integer(), nullable=False, server_default="0"))
    # Existing runs were all alert runs, unique by (episode, rule): keep exactly that key.
    op.execute(
        "UPDATE runs SET dedupe_key = CASE WHEN fingerprint IS NOT NULL "
        "THEN 'alert:' || fingerprint || ':' || starts_at || ':' || rule ELSE 'legacy:' || id END"
    )
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("dedupe_key", existing_type=sa.String(512), nullable=False)
        batch.drop_constraint("uq_runs_episode_rule", type_="unique")
        batch.create_unique_constraint("uq_runs_dedupe_key", ["dedupe_key"])
        batch.create_foreign_key("fk_runs_parent_run_id", "runs", ["parent_run_id"], ["id"])
        batch.create_index("ix_runs_episode", ["fingerprint", "starts_at"])
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("heartbeat_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("late_outcome", sa.String(16), nullable=True))


def downgrade() -> None:
    """Back to 0001 (runs that are not alert runs lose their uniqueness)."""
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("late_outcome")
        batch.drop_column("heartbeat_at")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_episode")
        batch.drop_constraint("fk_runs_parent_run_id", type_="foreignkey")
        batch.drop_constraint("uq_runs_dedupe_key", type_="unique")
        batch.create_unique_constraint("uq_runs_episode_rule", ["fingerprint", "starts_at", "rule"])
        for column in ("publishes", "step", "parent_run_id", "idempotency_key", "destructive", "target"):
            batch.drop_column(column)
        batch.drop_column("dedupe_key")
    with op.batch_alter_table("alert_events") as batch:
        batch.drop_index("ix_alert_events_handled_at")
        batch.drop_column("error")
        batch.drop_column("deliveries")
        batch.drop_column("publishes")
