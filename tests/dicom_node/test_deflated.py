"""Deflated instances: inflated chunk by chunk into a temporary file, never whole in memory."""

from __future__ import annotations

import tracemalloc
import zlib

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from dicom_node import dimse_status as st
from dicom_node.index import Index
from dicom_node.ingest import Ingestor, _parse_source
from dicom_node.storage import InstanceStore
from dicom_node.synthetic import ct_slice


def big_deflated(path, megabytes: int) -> None:
    """A deflated CT whose pixel data (zeros) inflates to `megabytes` MiB; about 100 KB on disk."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, rows=1024, cols=1024)
    ds.NumberOfFrames = megabytes // 2
    ds.PixelData = bytes(megabytes << 20)
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    raw = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    meta = dcmread(path, stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path.write_bytes(raw[:132] + buffer.getvalue() + deflate.compress(raw[meta_end:]) + deflate.flush())


def ingestor(tmp_path) -> Ingestor:
    return Ingestor(InstanceStore(tmp_path / "store"), Index(f"sqlite:///{tmp_path / 'index.db'}"))


def test_pydicoms_deflated_file_is_stored_as_received_and_indexed(tmp_path):
    source = get_testdata_file("image_dfl.dcm")
    result = ingestor(tmp_path).ingest_file(source)
    assert result.status == st.SUCCESS, result.message
    reference = dcmread(source)
    stored = tmp_path / "store" / reference.StudyInstanceUID / reference.SeriesInstanceUID / f"{reference.SOPInstanceUID}.dcm"
    assert stored.read_bytes() == open(source, "rb").read()


def test_a_deflated_instance_is_parsed_without_holding_it_inflated(tmp_path):
    path = tmp_path / "big.dcm"
    big_deflated(path, 64)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    header, has_pixels, _ = _parse_source(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    ds = header.dataset
    assert has_pixels and "PixelData" not in ds and ds.NumberOfFrames == 32
    assert peak < 8 << 20, f"parse allocated {peak >> 20} MiB for 64 MiB inflated"
    result = ingestor(tmp_path).ingest_file(path)
    assert result.status == st.SUCCESS, result.message


def test_a_cut_deflate_stream_is_refused_as_truncated(tmp_path):
    source = open(get_testdata_file("image_dfl.dcm"), "rb").read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(source[:-200])
    result = ingestor(tmp_path).ingest_file(cut)
    assert result.status == st.MALFORMED_DATASET
    assert "deflate" in result.message and len(result.error_comment) <= 64
