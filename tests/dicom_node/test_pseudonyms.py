"""Keyed pseudonyms of patient IDs: HMAC-SHA256 under a site key, the key id in front, rotation
keeping old rows findable; the generated per-install key; the audit and the CLI using them."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat

import pytest
from typer.testing import CliRunner

from dicom_node import audit, pseudonyms
from dicom_node.cli import app
from dicom_node.index import Index
from dicom_node.logs import phi_hash

OLD = "old-site-secret-0123456789"
NEW = "new-site-secret-9876543210"


@pytest.fixture
def restore_keys():
    """Tests below configure this process's keys; put the previous ones back afterwards."""
    saved = pseudonyms._active
    yield
    pseudonyms._active = saved


def test_pseudonym_is_hmac_sha256_under_the_site_key_with_its_id(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(f"k1:{OLD}\n")
    keys = pseudonyms.load(key_file, tmp_path)
    expected = hmac.new(OLD.encode(), b"MRN-000123", hashlib.sha256).hexdigest()[:16]
    assert keys.pseudonym("MRN-000123") == f"k1:{expected}"
    assert keys.pseudonym("MRN-000123") == keys.pseudonym(" MRN-000123 ")  # DICOM padding does not matter
    assert hashlib.sha256(b"MRN-000123").hexdigest()[:12] not in keys.pseudonym("MRN-000123")
    assert keys.pseudonym("") == "" and keys.pseudonym(None) == ""
    longest = tmp_path / "longest"
    longest.write_text(f"twelve-chars:{OLD}\n")
    assert len(pseudonyms.load(longest, tmp_path).pseudonym("MRN-000123")) == 29 <= 32  # phi_access.patient is String(32)
    other = tmp_path / "other"
    other.write_text(f"k1:{NEW}\n")
    assert pseudonyms.load(other, tmp_path).pseudonym("MRN-000123") != keys.pseudonym("MRN-000123")


def test_rotation_new_rows_carry_the_new_id_and_old_rows_stay_findable(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(OLD + "\n")  # one bare secret: key k1
    before = pseudonyms.load(key_file, tmp_path).pseudonym("MRN-7")
    assert before.startswith("k1:")
    key_file.write_text(f"# rotated\nk2:{NEW}\nk1:{OLD}\n")
    after = pseudonyms.load(key_file, tmp_path)
    assert after.current.key_id == "k2" and after.pseudonym("MRN-7").startswith("k2:")
    assert after.all_pseudonyms("MRN-7") == {"k2": after.pseudonym("MRN-7"), "k1": before}


@pytest.mark.parametrize("text, message", [
    ("", "holds no key"),
    ("k1:short\n", "shorter than 16"),
    (f"bad id!:{OLD}\n", "line 1: expected KEY_ID:SECRET"),
    (f"k1:{OLD}\nthirteen-char:{NEW}\n", "line 2: .*at most 12"),  # the pseudonym must fit the audit column
    (f"k1:{OLD}\nk1:{NEW}\n", "line 2: key id 'k1' listed twice"),
])
def test_a_malformed_key_file_is_refused_naming_the_line(tmp_path, text, message):
    key_file = tmp_path / "key"
    key_file.write_text(text)
    with pytest.raises(pseudonyms.PseudonymKeyError, match=message):
        pseudonyms.load(key_file, tmp_path)
    with pytest.raises(pseudonyms.PseudonymKeyError, match="no such file|No such file"):
        pseudonyms.load(tmp_path / "absent", tmp_path)


def test_without_a_key_file_a_random_key_is_generated_once_into_the_storage(tmp_path):
    first = pseudonyms.load(None, tmp_path / "store")
    path = tmp_path / "store" / pseudonyms.GENERATED_KEY_FILE
    assert first.current.key_id == "local" and first.source == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert pseudonyms.load(None, tmp_path / "store").pseudonym("MRN-1") == first.pseudonym("MRN-1")  # the same key
    assert pseudonyms.load(None, tmp_path / "another").pseudonym("MRN-1") != first.pseudonym("MRN-1")  # per install


def test_audit_rows_and_logs_use_the_configured_key(tmp_path, restore_keys):
    key_file = tmp_path / "key"
    key_file.write_text(f"site7:{NEW}\n")
    keys = pseudonyms.configure(key_file, tmp_path)
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        access = audit.record_access(index, audit.OPERATOR_VIEW, "1.2.3.4", patient_id="MRN-555")
        row = index.phi_accesses("1.2.3.4")[0]
    finally:
        index.dispose()
    assert access.patient == row["patient"] == keys.pseudonym("MRN-555") == phi_hash("MRN-555")
    assert row["patient"].startswith("site7:") and "MRN-555" not in json.dumps(row)


def test_cli_prints_the_pseudonym_under_every_key(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(f"k2:{NEW}\nk1:{OLD}\n")
    keys = pseudonyms.load(key_file, tmp_path)
    env = {"DICOM_NODE_PSEUDONYM_KEY_FILE": str(key_file), "DICOM_NODE_STORAGE_DIR": str(tmp_path)}
    result = CliRunner().invoke(app, ["pseudonym", "--json", "MRN-9"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == keys.all_pseudonyms("MRN-9")
    text = CliRunner().invoke(app, ["pseudonym", "MRN-9"], env=env).output.splitlines()
    assert text == [keys.pseudonym("MRN-9") + "  (current key)", keys.all_pseudonyms("MRN-9")["k1"]]
    key_file.write_text("k1:short\n")
    bad = CliRunner().invoke(app, ["pseudonym", "MRN-9"], env=env)
    assert bad.exit_code == 2 and "shorter than 16" in bad.output
    # No key file and no generated key yet: said so, and no key is invented for the look-up.
    empty = tmp_path / "empty-store"
    none = CliRunner().invoke(app, ["pseudonym", "MRN-9"], env={"DICOM_NODE_PSEUDONYM_KEY_FILE": "",
                                                                "DICOM_NODE_STORAGE_DIR": str(empty)})
    assert none.exit_code == 2 and "does not exist" in none.output and not empty.exists()


def test_the_longest_pseudonym_fits_the_audit_table_on_postgresql(tmp_path, postgres_url, restore_keys):
    key_file = tmp_path / "key"
    key_file.write_text(f"twelve-chars:{NEW}\n")
    keys = pseudonyms.configure(key_file, tmp_path)
    index = Index(postgres_url)
    try:
        audit.record_access(index, audit.OPERATOR_VIEW, "1.2.3.5", patient_id="MRN-556")
        rows = index.phi_accesses("1.2.3.5")
    finally:
        index.dispose()
    assert [row["patient"] for row in rows] == [keys.pseudonym("MRN-556")]  # VARCHAR(32) took it
