"""Prior retrieval over DICOM TLS from a real Orthanc that speaks only DICOM TLS and requires a client
certificate: C-FIND + C-GET on our TLS association, and C-MOVE where Orthanc opens a TLS association
of its own back to the node's TLS listener."""

from __future__ import annotations

import json
import urllib.request

import pytest

from dicom_node.priors import ArchiveUnavailable, RetrieveRefused, retrieve_priors
from tests.support.orthanc import Orthanc
from tests.support.pki import make_pki
from tests.support.procs import free_port
from tests.support.waiting import wait_until

from .conftest import Archive, ingest_current, make_history, prior_settings
from .history import write

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("pki")
    return {"hospital": make_pki(root / "hospital"), "other": make_pki(root / "other")}


@pytest.fixture(scope="module")
def tls_archive(tmp_path_factory, pki) -> Archive:
    """The seeded patient history in an Orthanc whose only DICOM port is TLS (seeded over REST)."""
    ca = pki["hospital"]
    root = tmp_path_factory.mktemp("tls-archive")
    history = make_history()
    orthanc = Orthanc(root / "orthanc", tls_cert=ca["server.pem"], tls_key=ca["server.key"], tls_trusted=ca["ca.pem"],
                      tls_require_peer_cert=True).start()
    try:
        files = {}
        for study in (history.current, history.recent, history.older_cr, history.ap_only):
            files[study.uid] = write(study.datasets(), root / "seed" / study.uid)
            for path in files[study.uid]:
                orthanc.upload(path)
        yield Archive(orthanc, history, files)
    finally:
        orthanc.stop()


def register(archive: Archive, ae_title: str, port: int, use_tls: bool, name: str = "node") -> None:
    """Orthanc's object form of a modality: "UseDicomTls" makes Orthanc's own associations to it TLS."""
    body = json.dumps({"AET": ae_title, "Host": "127.0.0.1", "Port": port, "UseDicomTls": use_tls}).encode()
    request = urllib.request.Request(f"{archive.orthanc.url}/modalities/{name}", data=body, method="PUT")
    urllib.request.urlopen(request, timeout=10).read()


def tls_config(archive: Archive, files: dict, method: str, ca: dict | None = None, **overrides):
    return archive.config(method, tls_enabled=True, tls_ca=(ca or files)["ca.pem"], tls_cert=files["client.pem"],
                          tls_key=files["client.key"], **overrides)


def assert_recent_prior_retrieved(result, archive: Archive) -> None:
    h = archive.history
    assert [p.study_uid for p in result.chosen] == [h.recent.uid]
    prior = result.chosen[0]
    assert sorted(prior.series_uids) == sorted(h.recent.series_uids[:2])  # PA and LATERAL images
    assert len(prior.instance_paths) == 4 and all(p.is_file() for p in prior.instance_paths)
    assert prior.report_text is not None and "Small left pleural effusion" in prior.report_text
    assert prior.missing_instances == 0 and not prior.reused_from_cache


def test_cfind_and_cget_over_tls(tls_archive, pki, node, worker_for):
    register(tls_archive, node.settings.ae_title, free_port(), use_tls=False)  # a known caller; C-GET needs no destination
    current = ingest_current(node, tls_archive)
    settings = prior_settings(node, tls_config(tls_archive, pki["hospital"], "c-get"))
    worker = worker_for(node)

    result = retrieve_priors(settings, worker.index, worker.ingestor, current)

    assert_recent_prior_retrieved(result, tls_archive)
    rules = {d.study_uid: d.rule for d in result.candidates}
    assert rules[tls_archive.history.ap_only.uid].startswith("view differs: AP")  # C-FIND answers came over TLS


def mutual_tls_node(make_node, ca):
    """A node with a TLS listener that requires a client certificate from the hospital CA."""
    return make_node(tls_enabled=True, tls_port=free_port(), tls_cert=ca["client.pem"], tls_key=ca["client.key"],
                     tls_ca=ca["ca.pem"], tls_require_client_cert=True)


def test_cmove_over_tls_to_the_nodes_tls_listener(tls_archive, pki, make_node, worker_for):
    ca = pki["hospital"]
    # The node has one certificate for both directions, as Orthanc has; it requires Orthanc's.
    node = mutual_tls_node(make_node, ca)
    # Only the TLS port is registered: a plain association to it would fail the handshake.
    register(tls_archive, node.settings.ae_title, node.settings.tls_port, use_tls=True)
    current = ingest_current(node, tls_archive)
    settings = prior_settings(node, tls_config(tls_archive, ca, "c-move"))
    worker = worker_for(node)

    result = retrieve_priors(settings, worker.index, worker.ingestor, current)

    assert_recent_prior_retrieved(result, tls_archive)
    # The node answers Orthanc's A-RELEASE-RQ before it writes the audit row, and Orthanc sends
    # its final C-MOVE response right after: the row may land a moment after retrieve_priors returns.
    def released():
        incoming = [a for a in node.index.recent_associations(20) if a["calling_ae"] == tls_archive.orthanc.aet]
        return incoming if incoming and all(a["result"] == "released" for a in incoming) else None

    incoming = wait_until(released, timeout=5, what="the call-back associations audited as released")
    assert sum(a["instances_received"] for a in incoming) >= 4


def test_cmove_without_tls_to_the_tls_listener_is_refused(tls_archive, pki, make_node, worker_for):
    """The control for the test above: Orthanc told to connect back without TLS gets nowhere."""
    ca = pki["hospital"]
    node = mutual_tls_node(make_node, ca)
    register(tls_archive, node.settings.ae_title, node.settings.tls_port, use_tls=False)
    current = ingest_current(node, tls_archive)
    settings = prior_settings(node, tls_config(tls_archive, ca, "c-move"))
    worker = worker_for(node)

    # The front door audits the failed handshake, so the node knows Orthanc did call back: a configuration error.
    with pytest.raises(RetrieveRefused, match="TLS handshake failed.*configure the PACS to use DICOM TLS"):
        retrieve_priors(settings, worker.index, worker.ingestor, current)
    assert not [a for a in node.index.recent_associations(20) if a["calling_ae"] == tls_archive.orthanc.aet]


def test_archive_with_an_untrusted_certificate_is_unavailable_with_a_tls_reason(tls_archive, pki, node, worker_for):
    register(tls_archive, node.settings.ae_title, free_port(), use_tls=False)
    current = ingest_current(node, tls_archive)
    settings = prior_settings(node, tls_config(tls_archive, pki["hospital"], "c-get", ca=pki["other"]))
    worker = worker_for(node)

    with pytest.raises(ArchiveUnavailable) as raised:
        retrieve_priors(settings, worker.index, worker.ingestor, current)

    message = str(raised.value)
    assert "DICOM TLS handshake" in message and "certificate is not trusted" in message, message
    assert f"{tls_archive.orthanc.aet}@127.0.0.1:{tls_archive.orthanc.dicom_port}" in message


def test_archive_certificate_must_name_the_host_dialled_unless_checking_is_off(tls_archive, pki, node, worker_for):
    """127.0.0.2 reaches the same Orthanc, but its certificate names only localhost and 127.0.0.1."""
    register(tls_archive, node.settings.ae_title, free_port(), use_tls=False)
    current = ingest_current(node, tls_archive)
    worker = worker_for(node)

    strict = prior_settings(node, tls_config(tls_archive, pki["hospital"], "c-get", host="127.0.0.2"))
    with pytest.raises(ArchiveUnavailable) as raised:
        retrieve_priors(strict, worker.index, worker.ingestor, current)
    message = str(raised.value)
    assert "not issued for the host dialled, '127.0.0.2': it names DNS:localhost, IP:127.0.0.1, CN=server" in message, message

    relaxed = prior_settings(node, tls_config(tls_archive, pki["hospital"], "c-get", host="127.0.0.2", tls_check_hostname=False))
    assert_recent_prior_retrieved(retrieve_priors(relaxed, worker.index, worker.ingestor, current), tls_archive)
