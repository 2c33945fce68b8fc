"""Initial schema: pools, sites, tasks, task failures, model blobs and versions.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Draft sections 6.1.3 (registry), 6.3.8 (pools), 6.2.1 (tasks), 6.2.2 (exception queue),
6.2.4 and 6.3.2 (model store).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the tables of revision 0001."""
    op.create_table(
        "pools",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("device", sa.String(length=20), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_pools"),
        sa.UniqueConstraint("name", name="uq_pools_name"),
    )
    op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=True),
        sa.Column("software_version", sa.String(length=100), nullable=False),
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=20), nullable=False),
        sa.Column("gpu_memory_mb", sa.Integer(), nullable=True),
        sa.Column("cpu_cores", sa.Integer(), nullable=True),
        sa.Column("dataset_size", sa.BigInteger(), nullable=True),
        sa.Column("key_fingerprint", sa.String(length=200), nullable=True),
        sa.Column("registered_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
        sa.Column("missed_replies", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["pool_id"], ["pools.id"], name="fk_sites_pool_id_pools"),
        sa.PrimaryKeyConstraint("id", name="pk_sites"),
        sa.UniqueConstraint("name", name="uq_sites_name"),
    )
    op.create_index("ix_sites_node_id", "sites", ["node_id"])
    op.create_index("ix_sites_pool_id", "sites", ["pool_id"])
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("segmentation_json", sa.Text(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("submitter", sa.String(length=200), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("pools_needed", sa.JSON(), nullable=False),
        sa.Column("min_sites", sa.Integer(), nullable=False),
        sa.Column("submitted_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("deadline_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("not_before", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
    )
    op.create_table(
        "task_failures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("exc_type", sa.String(length=200), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("log_tail", sa.Text(), nullable=False),
        sa.Column("hung", sa.Boolean(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_task_failures_task_id_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_task_failures"),
    )
    op.create_index("ix_task_failures_task_id", "task_failures", ["task_id"])
    op.create_table(
        "model_blobs",
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=20), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("content_hash", name="pk_model_blobs"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=200), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("sites", sa.JSON(), nullable=False),
        sa.Column("epsilon", sa.JSON(), nullable=False),
        sa.Column("he_params", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("rolled_back_from", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["content_hash"], ["model_blobs.content_hash"], name="fk_model_versions_content_hash_model_blobs"
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["model_versions.id"], name="fk_model_versions_parent_id_model_versions"
        ),
        sa.ForeignKeyConstraint(
            ["rolled_back_from"], ["model_versions.id"], name="fk_model_versions_rolled_back_from_model_versions"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
    )
    op.create_index("ix_model_versions_task_id", "model_versions", ["task_id"])
    op.create_index("ix_model_versions_content_hash", "model_versions", ["content_hash"])


def downgrade() -> None:
    """Drop the tables of revision 0001 (destroys every stored row)."""
    op.drop_table("model_versions")
    op.drop_table("model_blobs")
    op.drop_table("task_failures")
    op.drop_table("tasks")
    op.drop_table("sites")
    op.drop_table("pools")
