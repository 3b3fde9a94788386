"""The SCP with pynetdicom as the client: bad input, duplicates, disk guard, non-image objects.

Each case goes over a real association and checks the exact C-STORE status the sender gets,
that nothing wrong lands in the store, and that the association stays usable afterwards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import MediaStorageDirectoryStorage, Verification

from dicom_node import dimse_status as st
from dicom_node.scu import Peer, _make_ae, associate, send
from dicom_node.synthetic import ct_slice

from tests.support.dicom import dataset_bytes, incoming_files, stored_files
from tests.support.waiting import wait_until

from .conftest import NODE_AE


def store_files(node, *paths: Path) -> list[tuple[int, str]]:
    """C-STORE each file over one association; returns (status, error comment) per file."""
    ae = _make_ae("TESTSCU")
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    try:
        results = []
        for path in paths:
            rsp = assoc.send_c_store(path)
            results.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
        # The association survives every refusal: an echo still works.
        assert assoc.is_established
        return results
    finally:
        assoc.release()


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def stored(node) -> list[Path]:
    return stored_files(node.settings.storage_dir)


@pytest.fixture
def ct(tmp_path) -> Dataset:
    return ct_slice(generate_uid(), generate_uid(), 1)


def test_scu_send_folder(node, tmp_path, ct):
    folder = tmp_path / "outgoing"
    folder.mkdir()
    for number in range(1, 4):
        save(ct_slice(ct.StudyInstanceUID, ct.SeriesInstanceUID, number), folder / f"{number}.dcm")
    (folder / "notes.txt").write_text("not dicom")
    report = send(Peer("127.0.0.1", node.settings.port, NODE_AE), [folder], "TESTSCU")
    assert report.sent == 3 and report.failed == []
    assert [Path(p).name for p, _ in report.skipped] == ["notes.txt"]
    assert len(stored(node)) == 3


def test_path_traversal_uid_refused(node, tmp_path, ct):
    ct.StudyInstanceUID = "../../etc"
    [(status, comment)] = store_files(node, save(ct, tmp_path / "evil.dcm"))
    assert status == st.INVALID_UID
    assert "StudyInstanceUID" in comment
    assert stored(node) == []
    assert not (node.settings.storage_dir.parent / "etc").exists()


def test_missing_uid_refused(node, tmp_path, ct):
    del ct.SeriesInstanceUID
    [(status, comment)] = store_files(node, save(ct, tmp_path / "noseries.dcm"))
    assert status == st.MISSING_UID
    assert "SeriesInstanceUID" in comment
    assert stored(node) == []


def test_truncated_dataset_refused_then_association_still_works(node, tmp_path, ct):
    good = save(ct, tmp_path / "good.dcm")
    truncated = tmp_path / "truncated.dcm"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) - 500])
    second = save(ct_slice(ct.StudyInstanceUID, ct.SeriesInstanceUID, 2), tmp_path / "second.dcm")
    results = store_files(node, truncated, second)
    assert results[0][0] == st.MALFORMED_DATASET
    assert "7FE0,0010" in results[0][1] or "truncated" in results[0][1]
    assert results[1][0] == st.SUCCESS
    assert [p.name for p in stored(node)] == [f"{dcmread(second).SOPInstanceUID}.dcm"]


def test_garbage_after_meta_refused(node, tmp_path, ct):
    good = save(ct, tmp_path / "good.dcm")
    meta_end = len(good.read_bytes()) - len(ct.PixelData) - 2000
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(good.read_bytes()[:meta_end] + b"\xff\xfe\x00\x01" * 64)
    [(status, _)] = store_files(node, garbage)
    assert status in (st.MALFORMED_DATASET, st.MISSING_UID)
    assert stored(node) == []


def test_non_image_object_stored_but_not_analysed(node, tmp_path, ct):
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID
    sr.StudyInstanceUID, sr.SeriesInstanceUID = ct.StudyInstanceUID, generate_uid()
    sr.PatientID, sr.Modality = ct.PatientID, "SR"
    [(status, _)] = store_files(node, save(sr, tmp_path / "sr.dcm"))
    assert status == st.SUCCESS
    [row] = node.index.study_instances(ct.StudyInstanceUID)
    assert row["analysable"] is False
    # A study holding only a report completes without being queued for analysis.
    wait_until(lambda: node.index.study(ct.StudyInstanceUID)["state"] == "complete", what="study complete")
    assert node.index.outbox_rows() == []


def test_dicomdir_refused(node, tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = "TEST"
    [(status, comment)] = store_files(node, save(ds, tmp_path / "DICOMDIR"))
    assert status == st.MEDIA_DIRECTORY_REFUSED
    assert "DICOMDIR" in comment


def test_sop_instance_mismatch_with_request_refused(node, tmp_path, ct):
    path = save(ct, tmp_path / "a.dcm")
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the request carries this one
    ds.save_as(tmp_path / "mismatch.dcm")  # as is: enforce_file_format would fix the meta
    [(status, _)] = store_files(node, tmp_path / "mismatch.dcm")
    assert status == st.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert stored(node) == []


def test_identical_duplicate_acknowledged_once(node, tmp_path, ct):
    path = save(ct, tmp_path / "a.dcm")
    assert store_files(node, path, path) == [(st.SUCCESS, ""), (st.SUCCESS, "identical duplicate, already stored")]
    assert len(stored(node)) == 1
    assert node.index.counts()["instances"] == 1


@pytest.mark.parametrize(
    ("policy", "status", "kept"),
    [("keep_first", st.WARNING_DUPLICATE_CONFLICT, "first"), ("replace", st.WARNING_DUPLICATE_CONFLICT, "second"), ("reject", st.DUPLICATE_SOP_INSTANCE, "first")],
)
def test_conflicting_duplicate_policies(make_node, tmp_path, ct, policy, status, kept):
    node = make_node(duplicate_policy=policy)
    first = save(ct, tmp_path / "first.dcm")
    ct.PatientName = "CHANGED^NAME"
    second = save(ct, tmp_path / "second.dcm")
    results = store_files(node, first, second)
    assert results[0][0] == st.SUCCESS
    assert results[1][0] == status
    [final] = stored(node)
    expected = first if kept == "first" else second
    assert dataset_bytes(final) == dataset_bytes(expected)
    # Never silently lost: the other version is kept aside unless it was refused outright.
    conflicts = list((node.settings.storage_dir / ".conflicts").iterdir())
    if policy == "reject":
        assert conflicts == []
    else:
        other = second if kept == "first" else first
        assert [dataset_bytes(c) for c in conflicts] == [dataset_bytes(other)]


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_a_resent_conflicting_version_is_kept_once_by_content_hash(make_node, tmp_path, ct, policy):
    node = make_node(duplicate_policy=policy)
    first = save(ct, tmp_path / "first.dcm")
    ct.PatientName = "CHANGED^NAME"
    second = save(ct, tmp_path / "second.dcm")
    # keep_first: the second version arrives three times; replace: the two versions take turns.
    order = [first, second, second, second] if policy == "keep_first" else [first, second, first, second, first]
    results = store_files(node, *order)
    assert [status for status, _ in results[1:]] == [st.WARNING_DUPLICATE_CONFLICT] * (len(order) - 1)
    conflicts = sorted((node.settings.storage_dir / ".conflicts").iterdir())
    expected = [second] if policy == "keep_first" else [first, second]
    assert sorted(dataset_bytes(c) for c in conflicts) == sorted(dataset_bytes(e) for e in expected)
    for copy in conflicts:  # <SOPInstanceUID>.<sha256 of the file>.dcm
        assert copy.name == f"{ct.SOPInstanceUID}.{hashlib.sha256(copy.read_bytes()).hexdigest()}.dcm"
    [final] = stored(node)
    assert dataset_bytes(final) == dataset_bytes(order[-1] if policy == "replace" else first)


def test_disk_guard_answers_out_of_resources(make_node, tmp_path, ct):
    node = make_node(min_free_disk_mb=10**9)  # a petabyte: never available
    [(status, comment)] = store_files(node, save(ct, tmp_path / "a.dcm"))
    assert status == st.OUT_OF_RESOURCES
    assert "free space" in comment
    assert stored(node) == []
    assert incoming_files(node.settings.storage_dir) == []


def test_echo_with_pynetdicom(node):
    ae = _make_ae("TESTSCU")
    ae.add_requested_context(Verification)
    assoc = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
