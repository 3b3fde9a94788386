"""The index as dicom_node/index.py created it with metadata.create_all, before migrations.

A database created that way (tables, no alembic_version) is adopted: only the tables it lacks
are created (all of them when it is new), and it is then at this revision.

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())

    if "patients" not in existing:
        op.create_table(
            "patients",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("patient_id", sa.String(64), nullable=False),
            sa.Column("issuer", sa.String(64), nullable=False),
            sa.Column("patient_name", sa.String(324), nullable=False),
            sa.Column("birth_date", sa.String(8), nullable=False),
            sa.UniqueConstraint("patient_id", "issuer"),
        )

    if "studies" not in existing:
        op.create_table(
            "studies",
            sa.Column("study_uid", sa.String(64), primary_key=True),
            sa.Column("patient_key", sa.Integer, sa.ForeignKey("patients.id"), nullable=False),
            sa.Column("study_date", sa.String(8), nullable=False),
            sa.Column("study_time", sa.String(16), nullable=False),
            sa.Column("accession_number", sa.String(16), nullable=False),
            sa.Column("study_description", sa.String(64), nullable=False),
            sa.Column("modality", sa.String(16), nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("reanalysis", sa.Boolean, nullable=False),
            sa.Column("is_prior", sa.Boolean, nullable=False),
            sa.Column("urgent", sa.Boolean, nullable=False),
            sa.Column("first_received_at", sa.Float, nullable=False),
            sa.Column("last_received_at", sa.Float, nullable=False),
            sa.Column("completed_at", sa.Float),
        )

    if "series" not in existing:
        op.create_table(
            "series",
            sa.Column("series_uid", sa.String(64), primary_key=True),
            sa.Column("study_uid", sa.String(64), sa.ForeignKey("studies.study_uid"), nullable=False),
            sa.Column("modality", sa.String(16), nullable=False),
            sa.Column("body_part", sa.String(64), nullable=False),
            sa.Column("series_number", sa.String(12), nullable=False),
            sa.Column("series_description", sa.String(64), nullable=False),
        )
        op.create_index("ix_series_study_uid", "series", ["study_uid"])

    if "instances" not in existing:
        op.create_table(
            "instances",
            sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
            sa.Column("series_uid", sa.String(64), sa.ForeignKey("series.series_uid"), nullable=False),
            sa.Column("study_uid", sa.String(64), nullable=False),
            sa.Column("sop_class_uid", sa.String(64), nullable=False),
            sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
            sa.Column("instance_number", sa.String(12), nullable=False),
            sa.Column("view_position", sa.String(16), nullable=False),
            sa.Column("laterality", sa.String(16), nullable=False),
            sa.Column("analysable", sa.Boolean, nullable=False),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("size", sa.Integer, nullable=False),
            sa.Column("received_at", sa.Float, nullable=False),
        )
        op.create_index("ix_instances_series_uid", "instances", ["series_uid"])
        op.create_index("ix_instances_study_uid", "instances", ["study_uid"])

    if "associations" not in existing:
        op.create_table(
            "associations",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("calling_ae", sa.String(16), nullable=False),
            sa.Column("called_ae", sa.String(16), nullable=False),
            sa.Column("peer_host", sa.String(64), nullable=False),
            sa.Column("peer_port", sa.Integer, nullable=False),
            sa.Column("started_at", sa.Float, nullable=False),
            sa.Column("ended_at", sa.Float),
            sa.Column("instances_received", sa.Integer, nullable=False),
            sa.Column("failures", sa.Integer, nullable=False),
            sa.Column("result", sa.String(16), nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
        )

    if "prior_studies" not in existing:
        op.create_table(
            "prior_studies",
            sa.Column("study_uid", sa.String(64), primary_key=True),
            sa.Column("requested_at", sa.Float, nullable=False),
            sa.Column("last_used_at", sa.Float, nullable=False),
            sa.Column("in_use_until", sa.Float, nullable=False),
        )

    if "outbox" not in existing:
        op.create_table(
            "outbox",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("study_uid", sa.String(64), nullable=False),
            sa.Column("reason", sa.String(16), nullable=False),
            sa.Column("instance_set_hash", sa.String(64), nullable=False),
            sa.Column("instance_count", sa.Integer, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("published_at", sa.Float),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("last_error", sa.Text, nullable=False),
            sa.UniqueConstraint("study_uid", "instance_set_hash"),
        )
        op.create_index("ix_outbox_study_uid", "outbox", ["study_uid"])

    if "jobs" not in existing:
        op.create_table(
            "jobs",
            sa.Column("job_key", sa.String(64), primary_key=True),
            sa.Column("study_uid", sa.String(64), nullable=False),
            sa.Column("outbox_id", sa.Integer, nullable=False),
            sa.Column("instance_set_hash", sa.String(64), nullable=False),
            sa.Column("model_version", sa.String(128), nullable=False),
            sa.Column("priority", sa.String(16), nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("last_error", sa.Text, nullable=False),
            sa.Column("timings", sa.Text, nullable=False),
            sa.Column("result", sa.Text, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False),
        )
        op.create_index("ix_jobs_study_uid", "jobs", ["study_uid"])

    if "report_deliveries" not in existing:
        op.create_table(
            "report_deliveries",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("sop_instance_uid", sa.String(64), nullable=False),
            sa.Column("sop_class_uid", sa.String(64), nullable=False),
            sa.Column("study_uid", sa.String(64), nullable=False),
            sa.Column("destination", sa.String(64), nullable=False),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("next_attempt_at", sa.Float, nullable=False),
            sa.Column("last_attempt_at", sa.Float),
            sa.Column("last_error", sa.Text, nullable=False),
            sa.Column("response_status", sa.Integer),
            sa.Column("accepted_at", sa.Float),
            sa.Column("commitment_uid", sa.String(64)),
            sa.Column("committed_at", sa.Float),
            sa.UniqueConstraint("sop_instance_uid", "destination"),
        )
        op.create_index("ix_report_deliveries_sop_instance_uid", "report_deliveries", ["sop_instance_uid"])
        op.create_index("ix_report_deliveries_study_uid", "report_deliveries", ["study_uid"])
        op.create_index("ix_report_deliveries_status", "report_deliveries", ["status"])

    if "phi_access" not in existing:
        op.create_table(
            "phi_access",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("at", sa.Float, nullable=False),
            sa.Column("actor", sa.String(200), nullable=False),
            sa.Column("action", sa.String(32), nullable=False),
            sa.Column("study_uid", sa.String(64), nullable=False),
            sa.Column("patient", sa.String(32), nullable=False),
            sa.Column("peer", sa.String(200), nullable=False),
            sa.Column("detail", sa.Text, nullable=False),
        )
        op.create_index("ix_phi_access_study_uid", "phi_access", ["study_uid"])


def downgrade() -> None:
    for table in (
        "phi_access",
        "report_deliveries",
        "jobs",
        "outbox",
        "prior_studies",
        "associations",
        "instances",
        "series",
        "studies",
        "patients",
    ):
        op.drop_table(table)
