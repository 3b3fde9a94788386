"""The index schema comes from Alembic migrations (dicom_node/migrations), on SQLite and PostgreSQL.

test_head_matches_index_metadata fails whenever dicom_node.index's tables change without a new
revision in dicom_node/migrations/versions/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from dicom_node import migrations
from dicom_node.index import Index, metadata

REPO = Path(__file__).resolve().parents[2]
TABLES_0001 = {
    "patients", "studies", "series", "instances", "associations", "prior_studies", "outbox", "jobs",
    "report_deliveries", "phi_access",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A new, empty database: a SQLite file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return request.getfixturevalue("postgres_url")


def _revisions(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(migrations.current_revisions(conn))
    finally:
        engine.dispose()


def _pre_migrations_database(url: str, drop: tuple[str, ...] = ()) -> None:
    """What dicom_node.index's metadata.create_all made before migrations: 0001's tables, no alembic_version."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(migrations.config(conn), migrations.INITIAL_REVISION)
            conn.execute(text("DROP TABLE alembic_version"))
            for table in drop:
                conn.execute(text(f"DROP TABLE {table}"))
            conn.execute(text(
                "INSERT INTO patients (patient_id, issuer, patient_name, birth_date) VALUES ('P1', '', 'DOE^JANE', '19600101')"
            ))
            patient_key = conn.execute(text("SELECT id FROM patients")).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO studies (study_uid, patient_key, study_date, study_time, accession_number, "
                    "study_description, modality, state, reanalysis, is_prior, urgent, first_received_at, "
                    "last_received_at) VALUES ('1.2.3', :key, '20240101', '', 'A1', 'CT CHEST', 'CT', 'complete', "
                    "false, false, false, 1.0, 2.0)"
                ),
                {"key": patient_key},
            )
            conn.execute(text(
                "INSERT INTO outbox (study_uid, reason, instance_set_hash, instance_count, created_at, attempts, "
                "last_error) VALUES ('1.2.3', 'complete', 'abc', 1, 3.0, 0, '')"
            ))
    finally:
        engine.dispose()


def test_head_matches_index_metadata(db_url):
    index = Index(db_url)
    try:
        with index.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    finally:
        index.dispose()
    assert diff == [], (
        "dicom_node.index's tables differ from the migrated schema: add a revision in "
        "dicom_node/migrations/versions/ (see dicom_node/migrations/__init__.py):\n"
        + "\n".join(map(str, diff))
    )
    assert _revisions(db_url) == set(migrations.head_revisions())


@pytest.mark.parametrize("drop", [(), ("phi_access",)], ids=["complete", "from-before-phi_access"])
def test_database_from_before_migrations_is_adopted_with_its_rows(db_url, drop):
    _pre_migrations_database(db_url, drop)
    assert _revisions(db_url) == set()

    index = Index(db_url)
    try:
        assert _revisions(db_url) == set(migrations.head_revisions())
        assert TABLES_0001 <= set(inspect(index.engine).get_table_names())  # a missing table is created
        with index.engine.connect() as conn:
            assert conn.execute(text("SELECT patient_id, patient_name FROM patients")).all() == [("P1", "DOE^JANE")]
            assert conn.execute(text("SELECT study_uid, accession_number, state FROM studies")).all() == [
                ("1.2.3", "A1", "complete")
            ]
            assert conn.execute(text("SELECT study_uid, instance_set_hash FROM outbox")).all() == [("1.2.3", "abc")]
    finally:
        index.dispose()


def test_database_at_head_is_not_migrated_again(db_url, monkeypatch):
    Index(db_url).dispose()

    def fail(*args, **kwargs):
        raise AssertionError("upgrade ran on a database at head")

    monkeypatch.setattr(command, "upgrade", fail)
    Index(db_url).dispose()


def test_database_from_a_newer_version_is_refused(db_url):
    Index(db_url).dispose()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    with pytest.raises(RuntimeError, match="9999_from_the_future.*does not know"):
        Index(db_url)


def test_every_revision_downgrades_and_upgrades_again(db_url):
    Index(db_url).dispose()
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            command.downgrade(migrations.config(conn), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrations.upgrade(engine)
        assert TABLES_0001 <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert _revisions(db_url) == set(migrations.head_revisions())


def test_concurrent_first_starts_on_one_new_database(db_url):
    # Several processes (SCP, workers, replicas) open the same new index at once.
    code = "import sys; from dicom_node.index import Index; Index(sys.argv[1]).dispose()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, db_url], cwd=REPO, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [(p.returncode, err) for p in procs for err in [p.communicate(timeout=120)[1]] if p.returncode]
    assert errors == []
    assert _revisions(db_url) == set(migrations.head_revisions())
