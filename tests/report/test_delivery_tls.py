"""Report delivery over DICOM TLS to a real Orthanc that requires a client certificate: the report
arrives; a wrong CA or a missing client certificate fails the handshake with a specific error and the
report stays queued until the TLS settings are fixed."""

from __future__ import annotations

import pytest

from dicom_node.report import DeliveryQueue, build_sr
from tests.support.orthanc import Orthanc
from tests.support.pki import make_pki

from .conftest import pacs_destination, settings_for
from .test_delivery_orthanc import copies_in, study_of, upload


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("pki")
    return {"hospital": make_pki(root / "hospital"), "other": make_pki(root / "other")}


@pytest.fixture(scope="module")
def tls_pacs(tmp_path_factory, pki):
    """Orthanc speaking only DICOM TLS: its certificate signed by the hospital CA, trusting that CA,
    refusing peers without a certificate."""
    ca = pki["hospital"]
    pacs = Orthanc(tmp_path_factory.mktemp("tls-orthanc"), aet="PACS", tls_cert=ca["server.pem"], tls_key=ca["server.key"],
                   tls_trusted=ca["ca.pem"], tls_require_peer_cert=True).start()
    yield pacs
    pacs.stop()


def tls(files: dict, client: bool = True, ca: dict | None = None) -> dict:
    values = {"ca": str((ca or files)["ca.pem"])}
    if client:
        values.update(cert=str(files["client.pem"]), key=str(files["client.key"]))
    return values


def test_report_delivered_over_tls_with_a_client_certificate(cases, tls_pacs, pki, index, tmp_path):
    case = cases["growing_nodule"]
    upload(tls_pacs, case.current, case.prior)
    settings = settings_for(pacs_destination(tls_pacs, tls=tls(pki["hospital"])))
    queue = DeliveryQueue(index, tmp_path / "reports", settings)
    sr = build_sr(case.inp, settings)
    queue.enqueue(sr)

    summary = queue.deliver_due()

    assert summary.accepted == 1 and summary.failed == 0, summary.errors
    [row] = queue.rows()
    assert row.status == "accepted" and row.response_status == 0 and row.last_error == ""
    [copy] = copies_in(tls_pacs, sr.SOPInstanceUID)
    assert study_of(tls_pacs, copy) == case.current.StudyInstanceUID


@pytest.mark.parametrize(
    ("wrong", "change", "expected"),
    [
        ("ca", "new_nodule", "certificate is not trusted"),  # we trust another CA: Orthanc's certificate is refused
        ("no_client_cert", "shrinking_nodule", "wants a client certificate"),  # Orthanc requires one and gets none
    ],
)
def test_tls_misconfiguration_fails_specifically_and_keeps_the_report(cases, tls_pacs, pki, index, tmp_path, wrong, change, expected):
    case = cases[change]
    bad = tls(pki["hospital"], ca=pki["other"]) if wrong == "ca" else tls(pki["hospital"], client=False)
    settings = settings_for(pacs_destination(tls_pacs, tls=bad))
    queue = DeliveryQueue(index, tmp_path / "reports", settings)
    sr = build_sr(case.inp, settings)
    queue.enqueue(sr)

    summary = queue.deliver_due()

    assert summary.accepted == 0 and summary.failed == 1
    [row] = queue.pending()
    assert row.last_error.startswith("DICOM TLS handshake with PACS@127.0.0.1") and expected in row.last_error, row.last_error
    assert str(tls_pacs.dicom_port) in row.last_error
    assert copies_in(tls_pacs, sr.SOPInstanceUID) == []

    # Nothing lost: with the right TLS settings the same queued report goes through.
    fixed = DeliveryQueue(index, tmp_path / "reports", settings_for(pacs_destination(tls_pacs, tls=tls(pki["hospital"]))))
    assert [r.sop_instance_uid for r in fixed.pending()] == [sr.SOPInstanceUID]
    assert fixed.deliver_due(now=1e12).accepted == 1
    assert len(copies_in(tls_pacs, sr.SOPInstanceUID)) == 1


def test_destination_certificate_must_name_the_host_dialled_unless_checking_is_off(cases, tls_pacs, pki, index, tmp_path):
    """127.0.0.2 reaches the same Orthanc, but its certificate names only localhost and 127.0.0.1."""
    case = cases["resolved_nodule"]
    settings = settings_for(pacs_destination(tls_pacs, host="127.0.0.2", tls=tls(pki["hospital"])))
    queue = DeliveryQueue(index, tmp_path / "reports", settings)
    sr = build_sr(case.inp, settings)
    queue.enqueue(sr)

    assert queue.deliver_due().failed == 1
    [row] = queue.pending()
    assert row.last_error.startswith(f"DICOM TLS handshake with PACS@127.0.0.2:{tls_pacs.dicom_port} failed: the peer's "
                                     "certificate is not issued for the host dialled, '127.0.0.2': it names "
                                     "DNS:localhost, IP:127.0.0.1, CN=server"), row.last_error
    assert copies_in(tls_pacs, sr.SOPInstanceUID) == []

    relaxed = settings_for(pacs_destination(tls_pacs, host="127.0.0.2", tls={**tls(pki["hospital"]), "check_hostname": False}))
    assert DeliveryQueue(index, tmp_path / "reports", relaxed).deliver_due(now=1e12).accepted == 1
    assert len(copies_in(tls_pacs, sr.SOPInstanceUID)) == 1
