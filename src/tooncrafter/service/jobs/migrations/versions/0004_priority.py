"""Queue priority (X-Fal-Queue-Priority): every normal request is claimed before any low one.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"))
    op.create_index("ix_jobs_status_priority_seq", "jobs", ["status", "priority", "seq"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_priority_seq", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
