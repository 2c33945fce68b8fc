"""Event log table and the index the dispatcher's queue scan uses.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02

Draft sections 6.2.3 (log management: every segmentation, allocation, round,
aggregation, fault and privacy event with its timestamp) and 6.2.1 (dispatch scans
queued tasks by state and backoff time).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the ``events`` table and ``ix_tasks_state_not_before``; existing rows are untouched."""
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("task_id", sa.String(length=200), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_ts", "events", ["ts"])
    op.create_index("ix_events_kind", "events", ["kind"])
    op.create_index("ix_events_task_id", "events", ["task_id"])
    op.create_index("ix_tasks_state_not_before", "tasks", ["state", "not_before"])


def downgrade() -> None:
    """Drop the event log (its rows are lost) and the queue index."""
    op.drop_index("ix_tasks_state_not_before", table_name="tasks")
    op.drop_table("events")
