"""Metrics (/metrics): deployment-wide counters that outlive the job rows, and what workers report at check-in.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_WORKER_COLUMNS = (
    ("steps_per_second", sa.Float),
    ("gpu_memory_allocated_bytes", sa.BigInteger),
    ("gpu_memory_reserved_bytes", sa.BigInteger),
    ("gpu_memory_peak_bytes", sa.BigInteger),
)


def upgrade() -> None:
    op.create_table(
        "service_metrics",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("labels", sa.String(255), primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
    )
    with op.batch_alter_table("workers") as batch:
        for name, type_ in _WORKER_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        for name, _ in reversed(_WORKER_COLUMNS):
            batch.drop_column(name)
    op.drop_table("service_metrics")
