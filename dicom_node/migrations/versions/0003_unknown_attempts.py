"""Jobs count their unknown-class failures apart: only those spend `task_max_retries`, so a stage
that waited out a PACS outage (transient failures) is not failed by the next dead worker.

Revision ID: 0003_unknown_attempts
Revises: 0002_job_leases
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_unknown_attempts"
down_revision = "0002_job_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite cannot ALTER a table in place: batch copies it
        batch.add_column(sa.Column("unknown_attempts", sa.Integer, nullable=False, server_default="0"))
    # A job failing now with unknown errors keeps its budget spent: count its current run as unknown.
    op.execute("UPDATE jobs SET unknown_attempts = stage_attempts WHERE error_class = 'unknown'")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("unknown_attempts")
