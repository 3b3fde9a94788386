"""The SCP against DCMTK as an independent peer: echo, store, compression, parallelism, TLS, access control."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless, RLELossless

from dicom_node.synthetic import write_ct_study
from tests.support.dicom import dataset_bytes, stored_files
from tests.support.pki import make_pki
from tests.support.procs import free_port
from tests.support.waiting import wait_until

from .conftest import DCMTK_ENV, NODE_AE, require_tool, run_tool


def stored(node) -> list[Path]:
    return stored_files(node.settings.storage_dir)


def test_echoscu(node):
    run_tool("echoscu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port))
    assoc = wait_until(lambda: [a for a in node.index.recent_associations(1) if a["result"] == "released"], what="audit row")[0]
    assert assoc["calling_ae"] == "ECHOSCU"


def test_storescu_files_stored_byte_identical_and_indexed(node, ct_study):
    study_uid, paths = ct_study
    run_tool("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    for path in paths:
        sent = dcmread(path)
        stored = node.store.path_for(study_uid, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        # The dataset is kept exactly as received; the file meta is written by the SCP.
        assert dataset_bytes(stored) == dataset_bytes(path)
        assert dcmread(stored).file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    rows = node.index.study_instances(study_uid)
    assert {row["sop_instance_uid"] for row in rows} == {dcmread(p).SOPInstanceUID for p in paths}
    assert all(row["analysable"] for row in rows)
    audit = wait_until(lambda: [a for a in node.index.recent_associations(1) if a["result"] == "released"], what="audit row")[0]
    assert audit["instances_received"] == len(paths) and audit["failures"] == 0


def test_instances_of_mixed_sizes_on_one_association_stored_byte_identical(node, tmp_path):
    """Each connection reads its PDUs into one reused buffer, and files over HEADER_PREFIX are
    indexed from their first bytes: big (several PDUs), small and tiny instances, interleaved."""
    studies = [write_ct_study(tmp_path / f"ct{size}", 2, rows=size, cols=size) for size in (512, 128, 8)]
    paths = [path for pair in zip(*(paths for _, paths in studies)) for path in pair]  # 512, 128, 8, 512, ...
    run_tool("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    for study_uid, study_paths in studies:
        for path in study_paths:
            sent = dcmread(path)
            assert dataset_bytes(node.store.path_for(study_uid, sent.SeriesInstanceUID, sent.SOPInstanceUID)) == dataset_bytes(path)
        rows = node.index.study_instances(study_uid)
        assert {row["sop_instance_uid"] for row in rows} == {dcmread(p).SOPInstanceUID for p in study_paths}
        assert all(row["size"] == Path(row["path"]).stat().st_size and row["analysable"] for row in rows)


@pytest.mark.parametrize(
    ("compressor", "syntax", "propose"),
    [("dcmcjpls", JPEGLSLossless, "-xt"), ("dcmcrle", RLELossless, "-xr")],
)
def test_compressed_transfer_syntax_kept_as_received(node, tmp_path, ct_study, compressor, syntax, propose):
    _, paths = ct_study
    compressed = tmp_path / f"{compressor}.dcm"
    run_tool(compressor, str(paths[0]), str(compressed))
    assert dcmread(compressed).file_meta.TransferSyntaxUID == syntax
    run_tool("storescu", propose, "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), str(compressed))
    [stored_file] = stored(node)
    assert dcmread(stored_file).file_meta.TransferSyntaxUID == syntax
    assert dataset_bytes(stored_file) == dataset_bytes(compressed)
    # Still decodable to the original pixels (lossless).
    assert (dcmread(stored_file).pixel_array == dcmread(paths[0]).pixel_array).all()


def test_parallel_associations(node, tmp_path):
    folders = [write_ct_study(tmp_path / f"study{i}", 10)[1][0].parent for i in range(4)]
    errors: list[str] = []

    def send(folder: Path) -> None:
        result = subprocess.run(
            ["storescu", "+sd", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), str(folder)],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            errors.append(result.stderr)

    require_tool("storescu")
    threads = [threading.Thread(target=send, args=(folder,)) for folder in folders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(stored(node)) == 40
    assert node.index.counts()["studies"] == 4
    # The audit row is closed just after the release response reaches storescu.
    audits = wait_until(
        lambda: [a for a in node.index.recent_associations(4) if a["result"] == "released"] if all(
            a["result"] == "released" for a in node.index.recent_associations(4)) else None,
        what="four released associations",
    )
    assert sorted(a["instances_received"] for a in audits) == [10, 10, 10, 10]


def test_unknown_calling_ae_rejected_and_audited(make_node, ct_study):
    node = make_node(allowed_callers=["MODALITY1", "PACS@127.0.0.1"])
    result = run_tool("echoscu", "-aet", "INTRUDER", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), check=False)
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    audit = node.index.recent_associations(1)[0]
    assert audit["result"] == "rejected" and "INTRUDER" in audit["reason"]
    # Listed callers get in; a host-bound entry only from that host.
    run_tool("echoscu", "-aet", "MODALITY1", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port))
    run_tool("echoscu", "-aet", "PACS", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port))
    _, paths = ct_study
    refused = run_tool("storescu", "-aet", "INTRUDER", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), str(paths[0]), check=False)
    assert refused.returncode != 0
    assert stored(node) == []


def test_host_bound_caller_from_other_host_rejected(make_node):
    node = make_node(allowed_callers=["PACS@10.1.2.3"])
    result = run_tool("echoscu", "-aet", "PACS", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), check=False)
    assert result.returncode != 0
    assert "127.0.0.1" in node.index.recent_associations(1)[0]["reason"]


def test_wrong_called_ae_rejected(node):
    result = run_tool("echoscu", "-aec", "NOT_THE_NODE", "127.0.0.1", str(node.settings.port), check=False)
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr


def test_maximum_associations(make_node):
    from pynetdicom.sop_class import Verification

    from dicom_node.scu import Peer, _make_ae, associate

    node = make_node(max_associations=1)
    ae = _make_ae("HOLDER")
    ae.add_requested_context(Verification)
    held = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    try:
        result = run_tool("echoscu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), check=False)
        assert result.returncode != 0
        assert "Local Limit Exceeded" in result.stdout + result.stderr
    finally:
        held.release()


@pytest.fixture
def tls_files(tmp_path) -> dict[str, Path]:
    """A CA, a server certificate and a client certificate signed by it."""
    return make_pki(tmp_path / "pki")


def test_tls_association_with_client_certificate(make_node, tls_files, ct_study):
    node = make_node(
        tls_enabled=True,
        tls_port=free_port(),
        tls_cert=tls_files["server.pem"],
        tls_key=tls_files["server.key"],
        tls_ca=tls_files["ca.pem"],
        tls_require_client_cert=True,
    )
    _, paths = ct_study
    run_tool(
        "storescu", "+tls", str(tls_files["client.key"]), str(tls_files["client.pem"]),
        "+cf", str(tls_files["ca.pem"]), "-aec", NODE_AE, "127.0.0.1", str(node.settings.tls_port), *map(str, paths),
    )
    assert len(stored(node)) == len(paths)
    # Without a client certificate the TLS handshake is refused: nothing stored.
    anonymous = run_tool(
        "storescu", "+tla", "+cf", str(tls_files["ca.pem"]), "-aec", NODE_AE, "127.0.0.1", str(node.settings.tls_port), str(paths[0]),
        check=False,
    )
    assert anonymous.returncode != 0
