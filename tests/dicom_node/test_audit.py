"""The PHI access audit: one row per access, with the actor, the hashed patient and the peer."""

from __future__ import annotations

import getpass
import json
import os
from io import BytesIO

import pytest
from typer.testing import CliRunner

from dicom_node import audit
from dicom_node.cli import app
from dicom_node.index import Index
from dicom_node.ingest import Ingestor
from dicom_node.logs import JsonFormatter, phi_hash
from dicom_node.storage import InstanceStore
from dicom_node.synthetic import ct_slice


@pytest.fixture
def indexed_study(tmp_path):
    """An index holding one received CT study; yields (index, study UID, patient ID)."""
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    ds = ct_slice("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", 1)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert Ingestor(InstanceStore(tmp_path / "store"), index).ingest(buffer.getvalue()).ok
    yield index, str(ds.StudyInstanceUID), str(ds.PatientID)
    index.dispose()


def test_access_row_names_actor_patient_and_peer(indexed_study, monkeypatch):
    index, study_uid, patient_id = indexed_study
    monkeypatch.setattr(audit, "_role", "dicom-node worker")
    audit.record_access(index, audit.REPORT_SENT, study_uid, peer="pacs", detail="SR 1.2.3")
    [row] = index.phi_accesses(study_uid)
    assert row["action"] == "report_sent" and row["peer"] == "pacs" and row["detail"] == "SR 1.2.3"
    assert row["patient"] == phi_hash(patient_id) != ""  # looked up from the index, stored hashed
    assert row["actor"].startswith(f"dicom-node worker {getpass.getuser()}@") and row["actor"].endswith(f"pid {os.getpid()}")


def test_patient_given_for_a_study_not_in_the_index(indexed_study):
    index, _, _ = indexed_study
    audit.record_access(index, audit.ARCHIVE_QUERY, "1.2.3.4", peer="archive", patient_id="OTHER-7")
    assert index.phi_accesses("1.2.3.4")[0]["patient"] == phi_hash("OTHER-7")
    assert index.phi_accesses("9.9.9") == []


def test_unknown_action_is_refused(indexed_study):
    index, study_uid, _ = indexed_study
    with pytest.raises(ValueError, match="unknown PHI access action 'peek'"):
        audit.record_access(index, "peek", study_uid)
    assert index.phi_accesses() == []


def test_audit_command_lists_newest_first(indexed_study, tmp_path, monkeypatch):
    index, study_uid, patient_id = indexed_study
    audit.record_access(index, audit.IMAGE_READ, study_uid, detail="first")
    audit.record_access(index, audit.REPORT_SENT, study_uid, peer="pacs", detail="second")
    audit.record_access(index, audit.IMAGE_READ, "1.2.3.4", patient_id="X", detail="another study")
    monkeypatch.setenv("DICOM_NODE_DATABASE_URL", f"sqlite:///{tmp_path / 'index.db'}")
    result = CliRunner().invoke(app, ["audit", "--study", study_uid, "--json"])
    assert result.exit_code == 0, result.output
    assert [r["detail"] for r in json.loads(result.output)] == ["second", "first"]
    text = CliRunner().invoke(app, ["audit"]).output
    assert "report_sent" in text and "-> pacs" in text and patient_id not in text


def test_unwritable_row_goes_to_the_log_in_full(indexed_study, monkeypatch, caplog):
    """The access already happened (a report sent): a failed audit write must not undo or repeat it."""
    from sqlalchemy.exc import OperationalError

    index, study_uid, patient_id = indexed_study

    def database_locked(row):
        raise OperationalError("INSERT INTO phi_access", {}, Exception("database is locked"))

    monkeypatch.setattr(index, "record_phi_access", database_locked)
    with caplog.at_level("ERROR", logger="dicom_node.audit"):
        access = audit.record_access(index, audit.REPORT_SENT, study_uid, peer="pacs", detail="SR 1.2.3")
    assert access.patient == phi_hash(patient_id)
    [logged] = [r for r in caplog.records if r.getMessage() == "audit.write_failed"]
    line = JsonFormatter().format(logged)  # what the log file holds
    assert "database is locked" in line and '"action": "report_sent"' in line and '"peer": "pacs"' in line
    assert phi_hash(patient_id) in line and patient_id not in line
