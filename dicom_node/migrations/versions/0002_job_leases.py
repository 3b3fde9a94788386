"""The index drives the pipeline: job rows get a lease, per-stage attempts, the time of the next
attempt, the error class and the stage artifacts; a `leases` table holds the coordinator lease.

Jobs of the old pipeline in state `queued` start again at `priors` (same job key, same outputs).

Revision ID: 0002_job_leases
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_job_leases"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite cannot ALTER a table in place: batch copies it
        batch.add_column(sa.Column("stage_attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("error_class", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("first_error_at", sa.Float))
        batch.add_column(sa.Column("next_attempt_at", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("published_at", sa.Float))
        batch.add_column(sa.Column("lease_owner", sa.String(200)))
        batch.add_column(sa.Column("lease_until", sa.Float))
        batch.add_column(sa.Column("artifacts", sa.Text, nullable=False, server_default="{}"))
        batch.create_index("ix_jobs_state", ["state"])
    op.execute("UPDATE jobs SET state = 'priors' WHERE state = 'queued'")
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("until", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_state")
        for name in ("artifacts", "lease_until", "lease_owner", "published_at", "next_attempt_at", "first_error_at",
                     "error_class", "stage_attempts"):
            batch.drop_column(name)
