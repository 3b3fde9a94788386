"""`dicom-node send` against real peers that refuse things: DCMTK storescp with an association profile
that refuses a SOP class and some transfer syntaxes, and the node's own SCP.

The SCU goes on after every refusal, says per file why it failed, takes the SOP Instance UID from the
dataset (not the file meta), offers each file's own transfer syntax with uncompressed fallbacks, sends
as stored where the peer accepts that, and splits over several associations past 128 contexts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, UltrasoundImageStorage

from dicom_node.scu import Peer, send
from dicom_node.synthetic import ct_slice
from tests.support.dicom import stored_files
from tests.support.procs import REPO, free_port, stop, wait_for_port

from .conftest import NODE_AE

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.99.1"  # a vendor's private storage class: no one accepts it

# CT only uncompressed, MR only implicit VR, secondary capture also RLE, no ultrasound at all.
STORESCP_CFG = r"""
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[ImplicitOnly]
TransferSyntax1 = LittleEndianImplicit
[RLEOrUncompressed]
TransferSyntax1 = RLELossless
TransferSyntax2 = LocalEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[Picky]
PresentationContext1 = VerificationSOPClass\Uncompressed
PresentationContext2 = CTImageStorage\Uncompressed
PresentationContext3 = MRImageStorage\ImplicitOnly
PresentationContext4 = SecondaryCaptureImageStorage\RLEOrUncompressed

[[Profiles]]
[Picky]
PresentationContexts = Picky
"""


@pytest.fixture
def picky_storescp(tmp_path):
    """storescp refusing Ultrasound Image Storage and some transfer syntaxes; yields (peer, received folder)."""
    (tmp_path / "picky.cfg").write_text(STORESCP_CFG)
    received, port = tmp_path / "received", free_port()
    received.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "PICKY", "-xf", str(tmp_path / "picky.cfg"), "Picky", "-od", str(received), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield Peer("127.0.0.1", port, "PICKY"), received
    finally:
        stop(proc)


def instance(folder: Path, name: str, sop_class: str = CTImageStorage, syntax: str = ExplicitVRLittleEndian,
             meta_uid: str | None = None) -> tuple[Path, Dataset]:
    """A 64x64 slice of `sop_class` saved in `syntax`; `meta_uid`: a file meta naming another instance."""
    ds = ct_slice(generate_uid(), generate_uid(), 1)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    if syntax == RLELossless:
        ds.compress(RLELossless)
    elif syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    if meta_uid:
        ds.file_meta.MediaStorageSOPInstanceUID = meta_uid
    path = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=meta_uid is None)  # as is when the meta must disagree
    return path, ds


def received_by_uid(folder: Path) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in folder.iterdir())}


def reasons(report) -> dict[str, str]:
    return {Path(path).name: reason for path, reason in report.failed}


def test_refusals_do_not_stop_the_batch_and_each_is_explained(picky_storescp, tmp_path):
    peer, received = picky_storescp
    src = tmp_path / "src"
    ct1, ct1_ds = instance(src, "1-ct.dcm")
    us, _ = instance(src, "2-us.dcm", UltrasoundImageStorage)  # refused SOP class, in the middle of the batch
    mismatch, mismatch_ds = instance(src, "3-ct-meta-mismatch.dcm", meta_uid=generate_uid())
    sc_rle, sc_rle_ds = instance(src, "4-sc-rle.dcm", SecondaryCaptureImageStorage, RLELossless)
    ct_rle, ct_rle_ds = instance(src, "5-ct-rle.dcm", CTImageStorage, RLELossless)  # CT only uncompressed here
    mr, mr_ds = instance(src, "6-mr-explicit.dcm", MRImageStorage)  # MR only implicit VR here
    private, _ = instance(src, "7-private.dcm", PRIVATE_SOP_CLASS)

    report = send(peer, [src], "TESTSCU")

    assert report.sent == 5 and report.associations == 1, report
    failed = reasons(report)
    assert set(failed) == {"2-us.dcm", "7-private.dcm"}
    assert "accepted no presentation context for Ultrasound Image Storage (1.2.840.10008.5.1.4.1.1.6.1)" in failed["2-us.dcm"]
    assert "abstract syntax (SOP class) not supported" in failed["2-us.dcm"]
    assert PRIVATE_SOP_CLASS in failed["7-private.dcm"]

    got = received_by_uid(received)
    assert set(got) == {str(d.SOPInstanceUID) for d in (ct1_ds, mismatch_ds, sc_rle_ds, ct_rle_ds, mr_ds)}
    # Sent as stored where the peer accepts the file's own syntax (the RLE secondary capture stays RLE)...
    assert got[str(sc_rle_ds.SOPInstanceUID)].file_meta.TransferSyntaxUID == RLELossless
    assert got[str(sc_rle_ds.SOPInstanceUID)].PixelData == sc_rle_ds.PixelData
    # ...and decoded only where the peer accepts that SOP class uncompressed only, with the same pixels.
    ct_back = got[str(ct_rle_ds.SOPInstanceUID)]
    assert not ct_back.file_meta.TransferSyntaxUID.is_compressed
    assert (ct_back.pixel_array == ct_rle_ds.pixel_array).all()
    assert got[str(mr_ds.SOPInstanceUID)].file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    # The dataset's SOP Instance UID went in the request, as storescu does, not the file meta's.
    assert got[str(mismatch_ds.SOPInstanceUID)].file_meta.MediaStorageSOPInstanceUID == mismatch_ds.SOPInstanceUID
    converted = {Path(p).name: how for p, how in report.converted}
    assert set(converted) == {"3-ct-meta-mismatch.dcm", "5-ct-rle.dcm", "6-mr-explicit.dcm"}
    assert converted["5-ct-rle.dcm"].startswith("sent decompressed as Explicit VR Little Endian: the peer refused RLE Lossless")
    assert converted["6-mr-explicit.dcm"].startswith("sent re-encoded as Implicit VR Little Endian")


def test_no_decompress_skips_a_file_whose_syntax_the_peer_refused(picky_storescp, tmp_path):
    peer, received = picky_storescp
    ct_rle, _ = instance(tmp_path / "src", "ct-rle.dcm", CTImageStorage, RLELossless)
    ct, ct_ds = instance(tmp_path / "src", "ct.dcm")

    report = send(peer, [ct_rle, ct], "TESTSCU", decompress=False)

    assert report.sent == 1 and list(received_by_uid(received)) == [str(ct_ds.SOPInstanceUID)]
    [(path, reason)] = report.failed
    assert Path(path).name == "ct-rle.dcm"
    assert reason.startswith("skipped: the peer refused its transfer syntax RLE Lossless for CT Image Storage")


def test_a_file_that_cannot_be_decoded_for_a_peer_wanting_it_uncompressed_is_skipped_saying_so(picky_storescp, tmp_path):
    peer, received = picky_storescp
    path, ds = instance(tmp_path / "src", "ct-rle.dcm", CTImageStorage, RLELossless)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless  # RLE fragments labelled JPEG 2000: no decoder can read them
    ds.save_as(path)

    report = send(peer, [path], "TESTSCU")

    assert report.sent == 0 and list(received.iterdir()) == [] and report.associations == 1
    [(_, reason)] = report.failed
    assert reason.startswith("skipped: the peer refused its transfer syntax JPEG 2000 Image Compression (Lossless Only) "
                             "for CT Image Storage (1.2.840.10008.5.1.4.1.1.2) (it accepts Explicit VR Little Endian) "
                             "and it could not be decoded: "), reason


def test_the_nodes_own_scp_stores_the_rest_and_the_cli_summarises(node, tmp_path):
    src = tmp_path / "src"
    uids = [str(instance(src, f"{n}-ct.dcm")[1].SOPInstanceUID) for n in (1, 2)]
    instance(src, "3-private.dcm", PRIVATE_SOP_CLASS)
    uids.append(str(instance(src, "4-ct-meta-mismatch.dcm", meta_uid=generate_uid())[1].SOPInstanceUID))  # 0xA900 before
    uids.append(str(instance(src, "5-ct-rle.dcm", syntax=RLELossless)[1].SOPInstanceUID))

    result = subprocess.run([sys.executable, "-m", "dicom_node", "send", "127.0.0.1", str(node.settings.port), str(src),
                             "-c", NODE_AE, "-a", "TESTSCU"], capture_output=True, text=True, cwd=REPO, timeout=120)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAILED {src / '3-private.dcm'}: refused at association" in result.stderr
    assert "sent 4 (0 with warnings, 1 converted), failed 1, skipped 0, associations 1" in result.stdout
    assert "failures by reason:\n  1 x refused at association" in result.stdout
    stored = {p.stem: dcmread(p) for p in stored_files(node.settings.storage_dir)}
    assert sorted(stored) == sorted(uids)
    assert stored[uids[-1]].file_meta.TransferSyntaxUID == RLELossless  # the node accepts RLE: sent as stored


def test_more_than_128_contexts_are_split_over_associations(node, tmp_path):
    # 70 storage classes in RLE: two contexts each (RLE, and the uncompressed fallback) = 140 > 128.
    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:70]
    src = tmp_path / "src"
    for n, sop_class in enumerate(classes):
        instance(src, f"{n:03}.dcm", sop_class, RLELossless)

    report = send(Peer("127.0.0.1", node.settings.port, NODE_AE), [src], "TESTSCU")

    assert report.failed == [] and report.sent == 70 and report.associations == 2, report.failed[:3]
    assert len(stored_files(node.settings.storage_dir)) == 70


def test_unreachable_peer_fails_every_file_and_exits_2(tmp_path):
    src = tmp_path / "src"
    for n in (1, 2):
        instance(src, f"{n}.dcm")
    result = subprocess.run([sys.executable, "-m", "dicom_node", "send", "127.0.0.1", str(free_port()), str(src)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "send failed: could not connect" in result.stderr
    assert "failures by reason:\n  2 x not sent: could not connect" in result.stdout


@pytest.fixture
def misbehaving_scp():
    """A pynetdicom storage SCP whose C-STORE handler `behaviour` decides: yields (peer, set behaviour)."""
    from pynetdicom import AE, evt

    behaviour = {"on_store": None}

    def handle_store(event):
        return behaviour["on_store"](event)

    ae = AE(ae_title="ODD")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield Peer("127.0.0.1", port, "ODD"), behaviour
    finally:
        server.shutdown()


def test_a_peer_that_never_answers_is_told_from_one_that_aborts(misbehaving_scp, tmp_path):
    import time

    peer, behaviour = misbehaving_scp
    first, _ = instance(tmp_path / "src", "1.dcm")
    second, _ = instance(tmp_path / "src", "2.dcm")

    behaviour["on_store"] = lambda event: time.sleep(3) or 0x0000  # answers after the SCU stopped waiting
    silent = send(peer, [first, second], timeout=1)
    assert reasons(silent)["1.dcm"] == "no C-STORE response within 1s (dimse timeout): the association was aborted"
    assert reasons(silent)["2.dcm"].startswith("not sent: the association was aborted")

    def abort(event):
        event.assoc.abort()
        return 0x0000

    behaviour["on_store"] = abort
    aborted = send(peer, [first], timeout=10)
    reason = reasons(aborted)["1.dcm"]
    assert reason.startswith("no C-STORE response: the peer aborted the association or closed the connection ") and "s after the request" in reason
