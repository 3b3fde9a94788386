"""What real archives send: retired SOP classes, contexts we refuse, status comments, big instances."""

from __future__ import annotations

import logging
import re
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Verification

from dicom_node import dimse_status as st
from dicom_node.ingest import Ingestor, _parse_source, short_comment
from dicom_node.scu import Peer, _make_ae, associate
from dicom_node.storage import InstanceStore
from dicom_node.index import Index
from dicom_node.synthetic import ct_slice
from tests.support.dicom import dataset_bytes, stored_files

from .conftest import NODE_AE, run_tool

US_IMAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
UID = re.compile(r"\d+(?:\.\d+)+")


def save(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def events(caplog, name: str) -> list[dict]:
    return [getattr(r, "event_fields", {}) for r in caplog.records if r.getMessage() == name]


def test_retired_us_image_storage_is_accepted_and_stored(node, tmp_path):
    ds = ct_slice(generate_uid(), generate_uid(), 1)
    ds.SOPClassUID = US_IMAGE_RETIRED
    ds.Modality = "US"
    path = save(ds, tmp_path / "us.dcm")
    # -R: propose the file's own SOP class (storescu's default list has no retired ones).
    run_tool("storescu", "-R", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), str(path))
    [stored] = stored_files(node.settings.storage_dir)
    assert dataset_bytes(stored) == dataset_bytes(path)
    [row] = node.index.study_instances(ds.StudyInstanceUID)
    assert row["sop_class_uid"] == US_IMAGE_RETIRED and row["analysable"] is True


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.5", "1.2.840.10008.5.1.4.1.1.3", "1.2.840.10008.5.1.4.1.1.88.4"])
def test_other_retired_storage_classes_are_accepted(node, uid):
    ae = _make_ae("OLDPACS")
    ae.add_requested_context(uid)
    assoc = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [uid]
    finally:
        assoc.release()


def test_refused_presentation_contexts_are_logged_once_with_the_caller(node, caplog):
    caplog.set_level(logging.INFO, logger="dicom_node.scp")
    ae = _make_ae("MIXEDSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.3.4.5.6")  # no such SOP class
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")  # CT, unknown transfer syntax
    assoc = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    assoc.release()
    [logged] = events(caplog, "association.contexts_refused")
    assert logged["calling_ae"] == "MIXEDSCU" and logged["peer"].startswith("127.0.0.1:")
    assert logged["accepted"] == 1
    refused = " | ".join(logged["refused"])
    assert "1.2.3.4.5.6" in refused and "abstract syntax not supported" in refused
    assert "1.2.840.10008.5.1.4.1.1.2 (CT Image Storage): transfer syntaxes not supported" in refused


def test_sop_mismatch_comment_is_short_and_the_detail_is_logged(node, tmp_path, caplog):
    path = save(ct_slice(generate_uid(), generate_uid(), 1), tmp_path / "a.dcm")
    ds = dcmread(path)
    sent_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sent_uid  # the request carries this one
    ds.save_as(tmp_path / "mismatch.dcm")
    ae = _make_ae("MISMATCH")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    try:
        rsp = assoc.send_c_store(tmp_path / "mismatch.dcm")
    finally:
        assoc.release()
    assert int(rsp.Status) == st.DATASET_DOES_NOT_MATCH_SOP_CLASS
    comment = str(rsp.ErrorComment)
    assert len(comment) <= 64 and UID.search(comment) is None
    [refused] = events(caplog, "ingest.refused")
    assert ds.SOPInstanceUID in refused["reason"] and sent_uid in refused["reason"]


def test_short_comment_never_cuts_a_uid():
    a, b = "1.2.826.0.1.3680043.8.498.12345678901234567890123456", "1.2.826.0.1.3680043.8.498.98765432109876543210"
    text = f"SOPInstanceUID {a} differs from the C-STORE AffectedSOPInstanceUID {b}"
    short = short_comment(text)
    assert len(short) <= 64
    for token in UID.findall(short):
        assert token in (a, b)
    assert short_comment("fits as it is") == "fits as it is"


def write_big_instance(path: Path, pixel_bytes: int, truncate_by: int = 0) -> None:
    """A multi-frame CT whose pixel data is written in chunks (never held in memory here either)."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, rows=512, cols=512)
    frame = 512 * 512 * 2
    ds.NumberOfFrames = pixel_bytes // frame
    del ds.PixelData
    save(ds, path)
    with open(path, "ab") as f:
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (ds.NumberOfFrames * frame).to_bytes(4, "little"))
        chunk = b"\x01\x02" * (frame // 2)
        for _ in range(ds.NumberOfFrames):
            f.write(chunk)
        if truncate_by:
            f.truncate(f.tell() - truncate_by)


def test_header_only_parse_does_not_read_the_pixel_data(tmp_path):
    path = tmp_path / "big.dcm"
    write_big_instance(path, 64 << 20)
    tracemalloc.start()
    header, has_pixels, size = _parse_source(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert has_pixels and size > 64 << 20 and "PixelData" not in header.dataset
    assert peak < 4 << 20, f"parse allocated {peak >> 20} MiB"


def test_big_instance_ingested_from_its_file(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    ingestor = Ingestor(InstanceStore(tmp_path / "store"), index)
    good, cut = tmp_path / "big.dcm", tmp_path / "cut.dcm"
    write_big_instance(good, 32 << 20)
    write_big_instance(cut, 32 << 20, truncate_by=1000)
    tracemalloc.start()
    result = ingestor.ingest_file(good)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.ok and peak < 8 << 20, (result, peak)
    refused = ingestor.ingest_file(cut)
    assert refused.status == st.MALFORMED_DATASET
    assert refused.error_comment == "truncated dataset: element (7FE0,0010) cut short"
    # A resend of the same bytes is an identical duplicate, compared from the files.
    assert ingestor.ingest_file(good).message == "identical duplicate, already stored"
    index.dispose()


def test_truncated_encapsulated_pixel_data_is_refused(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    ingestor = Ingestor(InstanceStore(tmp_path / "store"), index)
    plain = save(ct_slice(generate_uid(), generate_uid(), 1), tmp_path / "a.dcm")
    jls = tmp_path / "jls.dcm"
    subprocess.run(["dcmcjpls", str(plain), str(jls)], check=True)
    data = jls.read_bytes()
    for cut in (1, 9, 300):
        (tmp_path / "cut.dcm").write_bytes(data[:-cut])
        result = ingestor.ingest_file(tmp_path / "cut.dcm")
        assert result.status == st.MALFORMED_DATASET and "truncated" in result.message, (cut, result)
    assert ingestor.ingest_file(jls).ok
    index.dispose()
