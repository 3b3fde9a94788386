"""Delivery faults a real PACS cannot be made to produce on demand, from controllable pynetdicom peers:
a SOP class refused, a timeout mid-transfer, failure and warning statuses; plus the outbox's own rules."""

from __future__ import annotations

import copy
import json
import random
import threading
import time

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, CTImageStorage, Verification

from dicom_node.config import Settings
from dicom_node.netutil import CONNECTION_HANDLER
from dicom_node.report import DeliveryQueue, ReportSettings, build_sr
from tests.support.procs import free_port

from .conftest import settings_for

FAR_FUTURE = 1e12


class FakePacs:
    """A C-STORE SCP whose answers the test decides: status code, delay, accepted SOP classes."""

    def __init__(self, sop_classes=(Comprehensive3DSRStorage,), status: int = 0x0000, delay: float = 0.0) -> None:
        self.status, self.delay = status, delay
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="FAKEPACS")
        for sop_class in (*sop_classes, Verification):  # every PACS answers C-ECHO
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[CONNECTION_HANDLER, (evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        if self.delay:
            time.sleep(self.delay)
        self.received.append(event.dataset.SOPInstanceUID)
        return self.status

    def destination(self, **overrides) -> dict:
        values = dict(name="fake", ae_title="FAKEPACS", host="127.0.0.1", port=self.port, timeout_seconds=2)
        values.update(overrides)
        return values

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def fake_pacs():
    peers: list[FakePacs] = []

    def start(**kwargs) -> FakePacs:
        peers.append(FakePacs(**kwargs))
        return peers[-1]

    yield start
    for peer in peers:
        peer.stop()


@pytest.fixture
def sr(cases):
    return build_sr(cases["new_nodule"].inp, ReportSettings())


def test_destination_that_rejects_the_sr_sop_class(fake_pacs, sr, index, tmp_path):
    pacs = fake_pacs(sop_classes=[CTImageStorage])
    queue = DeliveryQueue(index, tmp_path / "out", settings_for(pacs.destination()))
    queue.enqueue(sr)
    summary = queue.deliver_due()
    [row] = queue.pending()
    assert summary.failed == 1 and pacs.received == []
    assert "does not accept SOP class Comprehensive 3D SR Storage" in row.last_error
    assert "configure the PACS" in row.last_error


def test_timeout_mid_transfer_is_retried_and_then_delivered(fake_pacs, sr, index, tmp_path):
    pacs = fake_pacs(delay=4.0)  # answers after our 2 s DIMSE timeout
    queue = DeliveryQueue(index, tmp_path / "out", settings_for(pacs.destination()))
    queue.enqueue(sr)
    started = time.monotonic()
    summary = queue.deliver_due()
    assert time.monotonic() - started < 6  # the timeout bounds the wait
    [row] = queue.pending()
    assert summary.failed == 1 and "no C-STORE response from fake within 2s" in row.last_error
    pacs.delay = 0.0
    time.sleep(2.5)  # let the aborted association's handler finish
    assert queue.deliver_due(now=FAR_FUTURE).accepted == 1
    assert queue.pending() == [] and sr.SOPInstanceUID in pacs.received


def test_failure_status_is_retried_warning_status_is_accepted_and_logged(fake_pacs, sr, index, tmp_path, caplog):
    pacs = fake_pacs(status=0xA700)
    queue = DeliveryQueue(index, tmp_path / "out", settings_for(pacs.destination()))
    queue.enqueue(sr)
    queue.deliver_due()
    [row] = queue.pending()
    assert row.response_status == 0xA700 and "status 0xA700 (out of resources)" in row.last_error

    pacs.status = 0xB007
    with caplog.at_level("WARNING", logger="dicom_node.report.delivery"):
        summary = queue.deliver_due(now=FAR_FUTURE)
    assert summary.accepted == 1 and summary.warnings == 1
    [row] = queue.rows()
    assert row.status == "accepted" and row.response_status == 0xB007 and "0xB007" in row.last_error
    assert any(r.message == "report.delivered_with_warning" for r in caplog.records)


def test_backoff_doubles_with_jitter_up_to_the_cap(index, tmp_path):
    settings = ReportSettings(backoff_base_seconds=10, backoff_max_seconds=100, backoff_jitter=0.2)
    queue = DeliveryQueue(index, tmp_path / "out", settings, rng=random.Random(7))
    for attempts, nominal in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (12, 100)]:
        delays = [queue.backoff(attempts) for _ in range(200)]
        assert nominal * 0.8 <= min(delays) and max(delays) <= nominal * 1.2
        assert max(delays) - min(delays) > nominal * 0.2  # really jittered, so nodes do not retry in lockstep


def test_outbox_is_durable_idempotent_and_follows_the_destination_list(fake_pacs, sr, index, tmp_path):
    one = fake_pacs()
    queue = DeliveryQueue(index, tmp_path / "out", settings_for(one.destination(name="a")))
    [row] = queue.enqueue(sr)
    assert dcmread(row.path).SOPInstanceUID == sr.SOPInstanceUID
    first_bytes = open(row.path, "rb").read()
    assert len(queue.enqueue(sr)) == 1 and len(queue.rows()) == 1  # same report again: nothing new

    # a destination added to the configuration gets the report too; a removed one is reported, not dropped
    two = fake_pacs()
    grown = DeliveryQueue(index, tmp_path / "out", settings_for(two.destination(name="b")))
    rows = grown.enqueue(sr)
    assert sorted(r.destination for r in rows) == ["a", "b"]
    assert open(row.path, "rb").read() == first_bytes  # the first file is kept
    summary = grown.deliver_due()
    assert summary.accepted == 1 and two.received == [sr.SOPInstanceUID] and one.received == []
    [left] = grown.pending()
    assert left.destination == "a" and "no longer configured" in left.last_error


def test_concurrent_workers_send_each_report_once(fake_pacs, cases, index, tmp_path):
    pacs = fake_pacs()
    settings = settings_for(pacs.destination())
    queues = [DeliveryQueue(index, tmp_path / "out", settings) for _ in range(2)]
    reports = [build_sr(case.inp, settings) for case in cases.values()]
    for report in reports:
        queues[0].enqueue(report)
    threads = [threading.Thread(target=q.deliver_due) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(pacs.received) == sorted(r.SOPInstanceUID for r in reports)
    assert queues[1].pending() == []


def test_settings_from_environment_and_validation(monkeypatch):
    monkeypatch.setenv("DICOM_NODE_REPORT__DESTINATIONS", json.dumps([
        {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104, "storage_commitment": True,
         "tls": {"ca": "/etc/ssl/pacs-ca.pem"}},
        {"name": "web", "kind": "stow-rs", "stow_url": "https://pacs/dicom-web"},
    ]))
    monkeypatch.setenv("DICOM_NODE_REPORT__OVERLAY_SC_ENABLED", "true")
    monkeypatch.setenv("DICOM_NODE_REPORT__BACKOFF_MAX_SECONDS", "60")
    report = Settings().report
    assert [d.name for d in report.destinations] == ["pacs", "web"]
    assert report.destinations[0].tls.ca.name == "pacs-ca.pem" and report.destinations[0].storage_commitment
    assert report.overlay_sc_enabled and report.backoff_max_seconds == 60 and report.language == "en-US"
    defaults = ReportSettings()
    assert defaults.destinations == [] and not defaults.overlay_sc_enabled
    for bad, message in [
        ([{"name": "w", "kind": "stow-rs"}], "needs stow_url"),
        ([{"name": "a"}, {"name": "a"}], "must be unique"),
        ([{"name": "a", "ae_title": "X" * 17}], "1-16 printable"),
        ([{"name": "w", "kind": "stow-rs", "stow_url": "http://x", "storage_commitment": True}], "c-store only"),
    ]:
        with pytest.raises(ValidationError, match=message):
            ReportSettings(destinations=bad)


def test_one_jobs_delivery_sends_only_its_own_objects(fake_pacs, sr, index, tmp_path):
    pacs = fake_pacs()
    queue = DeliveryQueue(index, tmp_path / "out", settings_for(pacs.destination()))
    other = copy.deepcopy(sr)
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    queue.enqueue(sr)
    queue.enqueue(other)
    summary = queue.deliver_due(only=[str(sr.SOPInstanceUID)])
    assert summary.accepted == 1 and pacs.received == [str(sr.SOPInstanceUID)]
    [waiting] = queue.pending()
    assert waiting.sop_instance_uid == other.SOPInstanceUID and waiting.attempts == 0  # untouched, still due
