"""Delivery to a real PACS (Orthanc): every report type stored, retrieved and compared; PACS down and
back; rejected AE titles; STOW-RS; Storage Commitment."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicom_node.netutil import CONNECTION_HANDLER
from dicom_node.scu import AssociationFailed, Peer, echo
from dicom_node.report import DeliveryQueue, build_overlay_sc, build_sr
from tests.support.orthanc import Orthanc
from tests.support.procs import free_port
from tests.support.waiting import wait_until

from tests.support.validation import assert_valid_dicom

from .conftest import pacs_destination, settings_for

FAR_FUTURE = 1e12  # "now" for deliver_due when a retry must be due whatever the backoff


def upload(pacs: Orthanc, *datasets) -> None:
    for ds in datasets:
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        pacs.post("/instances", buffer.getvalue())


def copies_in(pacs: Orthanc, sop_uid: str) -> list[dict]:
    return pacs.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}, "Expand": True})


def study_of(pacs: Orthanc, instance: dict) -> str:
    series = pacs.get(f"/series/{instance['ParentSeries']}")
    return pacs.get(f"/studies/{series['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]


def test_every_report_type_is_stored_in_its_study_and_comes_back_identical(cases, orthanc, index, tmp_path):
    settings = settings_for(pacs_destination(orthanc), overlay_sc_enabled=True)
    queue = DeliveryQueue(index, tmp_path / "reports", settings)
    sent = {}
    for name, case in cases.items():
        upload(orthanc, case.current, *([case.prior] if case.prior is not None else []))
        sent[name] = build_sr(case.inp, settings)
        queue.enqueue(sent[name])
    overlay = build_overlay_sc(cases["growing_nodule"].inp, settings)
    queue.enqueue(overlay)

    summary = queue.deliver_due()
    assert summary.failed == 0 and summary.accepted == len(cases) + 1, summary.errors
    assert queue.pending() == []

    for name, sr in sent.items():
        [copy] = copies_in(orthanc, sr.SOPInstanceUID)
        case = cases[name]
        assert study_of(orthanc, copy) == case.current.StudyInstanceUID
        # the PACS's study holds the current image and our report side by side
        study_sops = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_study(case.current.StudyInstanceUID)}
        assert {case.current.SOPInstanceUID, sr.SOPInstanceUID} <= study_sops
        back_path = tmp_path / f"{name}-from-pacs.dcm"
        back_path.write_bytes(orthanc.instance_file(copy["ID"]))
        assert_valid_dicom(back_path)
        back, ours = dcmread(back_path), dcmread(queue.store.path_for(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID))
        del back.file_meta, ours.file_meta
        assert back == ours, f"{name}: the PACS returned a different object"
    [sc] = copies_in(orthanc, overlay.SOPInstanceUID)
    assert study_of(orthanc, sc) == cases["growing_nodule"].current.StudyInstanceUID


def test_pacs_down_then_up_delivers_exactly_one_copy_and_survives_a_restart(cases, orthanc, index, tmp_path):
    settings = settings_for(pacs_destination(orthanc))
    sr = build_sr(cases["new_nodule"].inp, settings)
    orthanc.stop()

    queue = DeliveryQueue(index, tmp_path / "reports", settings)
    queue.enqueue(sr)
    before = time.time()
    summary = queue.deliver_due()
    assert summary.failed == 1 and summary.accepted == 0
    [row] = queue.pending()
    assert row.attempts == 1 and "could not connect" in row.last_error and str(orthanc.dicom_port) in row.last_error
    assert before + 0.75 <= row.next_attempt_at <= time.time() + 1.25  # base 1 s, +/- 25 % jitter
    assert queue.deliver_due().attempted == 0  # not due yet: no hammering of a PACS that is down
    queue.deliver_due(now=FAR_FUTURE)
    [row] = queue.pending()
    assert row.attempts == 2 and row.next_attempt_at >= FAR_FUTURE + 1.5  # doubled

    orthanc.start()
    # the node restarts: a new queue over the same database and folder still has the report
    restarted = DeliveryQueue(type(index)(str(index.engine.url)), tmp_path / "reports", settings)
    assert [r.sop_instance_uid for r in restarted.pending()] == [sr.SOPInstanceUID]
    restarted.enqueue(build_sr(cases["new_nodule"].inp, settings))  # the job is retried: same UID, no new row
    assert len(restarted.rows()) == 1
    summary = restarted.deliver_due(now=FAR_FUTURE * 2)
    assert summary.accepted == 1 and restarted.pending() == []
    [row] = restarted.rows()
    assert row.status == "accepted" and row.attempts == 3 and row.response_status == 0
    assert len(copies_in(orthanc, sr.SOPInstanceUID)) == 1
    assert restarted.deliver_due(now=FAR_FUTURE * 3).attempted == 0  # accepted rows are never sent again


@dataclass
class StrictOrthanc(Orthanc):
    """A PACS that only accepts stores from the AE titles it knows."""

    def config(self) -> dict:
        config = super().config()
        config["DicomAlwaysAllowStore"] = False
        config["DicomAlwaysAllowEcho"] = False
        return config


def test_unregistered_calling_ae_gets_a_clear_message(cases, index, tmp_path):
    pacs = StrictOrthanc(tmp_path / "strict", aet="PACS").start()
    try:
        queue = DeliveryQueue(index, tmp_path / "reports", settings_for(pacs_destination(pacs)), ae_title="UNKNOWN_NODE")
        queue.enqueue(build_sr(cases["stable"].inp, queue.settings))
        errors = []
        # Orthanc (DCMTK) closes right after its A-ASSOCIATE-RJ; now and then that close is a reset
        # that discards the RJ before it is read, and the attempt can only say "aborted". The outbox
        # tries again (the row stays pending), and the next attempt names the reason.
        for attempt in range(3):
            summary = queue.deliver_due(now=time.time() + 3600 * (attempt + 1))
            [row] = queue.pending()
            assert summary.failed == 1
            errors.append(row.last_error)
            if "register this node's AE title" in row.last_error:
                break
        assert "register this node's AE title" in row.last_error and "UNKNOWN_NODE" in row.last_error, errors
        assert copies_in(pacs, build_sr(cases["stable"].inp, queue.settings).SOPInstanceUID) == []
    finally:
        pacs.stop()


def test_wrong_called_ae_title_is_named(cases, orthanc, index, tmp_path):
    queue = DeliveryQueue(index, tmp_path / "reports", settings_for(pacs_destination(orthanc, ae_title="NOT_THE_PACS")))
    queue.enqueue(build_sr(cases["stable"].inp, queue.settings))
    queue.deliver_due()
    [row] = queue.pending()
    assert "called AE title not recognised" in row.last_error and "NOT_THE_PACS" in row.last_error


def test_a_fast_rejection_is_always_read_as_one(orthanc):
    # Orthanc rejects at once over loopback; pynetdicom 3.0 sometimes closes the socket before
    # its ACSE looks and then aborts (1 in 20 to 1 in 100 here before scu._unread_rejection).
    peer = Peer("127.0.0.1", orthanc.dicom_port, ae_title="NOT_THE_PACS")
    messages = []
    for _ in range(200):
        with pytest.raises(AssociationFailed) as failure:
            echo(peer)
        messages.append(str(failure.value))
    assert all("called AE title not recognised" in m for m in messages), [m for m in messages if "recognised" not in m][:1]


def test_stow_rs_destination(cases, orthanc, index, tmp_path):
    stow = dict(name="web", kind="stow-rs", stow_url=f"{orthanc.url}/dicom-web", timeout_seconds=10)
    settings = settings_for(stow, pacs_destination(orthanc))
    queue = DeliveryQueue(index, tmp_path / "reports", settings)
    sr = build_sr(cases["growing_nodule"].inp, settings)
    queue.enqueue(sr)
    assert {r.destination for r in queue.rows()} == {"web", "pacs"}  # one row per destination
    summary = queue.deliver_due()
    assert summary.accepted == 2, summary.errors
    assert len(copies_in(orthanc, sr.SOPInstanceUID)) == 1  # same object twice: still one report

    broken = settings_for(dict(stow, stow_url=f"{orthanc.url}/no-such-root"))
    queue2 = DeliveryQueue(index, tmp_path / "reports2", broken)
    queue2.enqueue(build_sr(cases["refused"].inp, broken))
    queue2.deliver_due()
    [row] = [r for r in queue2.pending() if r.destination == "web"]
    assert "HTTP 404" in row.last_error and row.response_status == 404


def test_storage_commitment_with_orthanc(cases, index, tmp_path):
    node_port = free_port()
    pacs = Orthanc(tmp_path / "pacs", aet="PACS", modalities={"node": ("DICOM_NODE", "127.0.0.1", node_port)}).start()
    settings = settings_for(pacs_destination(pacs, storage_commitment=True))
    queue = DeliveryQueue(index, tmp_path / "reports", settings)
    # The node's listener, as its SCP will bind it: accepts the PACS's N-EVENT-REPORT
    listener = AE(ae_title="DICOM_NODE")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", node_port), block=False, evt_handlers=[
        CONNECTION_HANDLER, (evt.EVT_N_EVENT_REPORT, queue.handle_commitment_report)])
    try:
        sr = build_sr(cases["shrinking_nodule"].inp, settings)
        queue.enqueue(sr)
        summary = queue.deliver_due()
        assert summary.accepted == 1 and summary.commitments_requested == 1, summary.errors
        assert [r.status for r in queue.rows()] in (["committing"], ["committed"])
        wait_until(lambda: queue.rows()[0].status == "committed", timeout=20, what="the storage commitment report")
        assert queue.pending() == [] and queue.rows()[0].committed_at is not None
    finally:
        server.shutdown()
        pacs.stop()


def test_commitment_refused_for_an_unknown_ae_keeps_the_report_pending(cases, orthanc, index, tmp_path):
    """Orthanc cannot answer a commitment for an AE it does not know: the report is not silently done."""
    settings = settings_for(pacs_destination(orthanc, storage_commitment=True))
    queue = DeliveryQueue(index, tmp_path / "reports", settings)
    queue.enqueue(build_sr(cases["resolved_nodule"].inp, settings))
    summary = queue.deliver_due()
    [row] = queue.pending()
    assert summary.accepted == 1 and summary.commitments_requested == 0
    assert row.status == "pending" and "storage commitment request not accepted" in row.last_error
    assert "registered" in row.last_error


def test_unanswered_commitment_is_sent_again(cases, index, tmp_path):
    """The PACS accepts the commitment request but its answer never reaches us (nothing listens)."""
    pacs = Orthanc(tmp_path / "pacs", aet="PACS", modalities={"node": ("DICOM_NODE", "127.0.0.1", free_port())}).start()
    try:
        settings = settings_for(pacs_destination(pacs, storage_commitment=True), commitment_timeout_seconds=60)
        queue = DeliveryQueue(index, tmp_path / "reports", settings)
        queue.enqueue(build_sr(cases["resolved_nodule"].inp, settings))
        now = time.time()
        assert queue.deliver_due(now=now).commitments_requested == 1
        assert [r.status for r in queue.pending()] == ["committing"]
        queue.deliver_due(now=now + 30)
        assert [r.status for r in queue.pending()] == ["committing"]  # still within the timeout
        summary = queue.deliver_due(now=now + 61)  # expired: stored again, commitment asked again
        [row] = queue.pending()
        assert summary.attempted == 1 and row.attempts == 2 and row.status == "committing"
        assert any("no Storage Commitment result within 60s" in e for e in summary.errors)
        assert len(copies_in(pacs, row.sop_instance_uid)) == 1
    finally:
        pacs.stop()
