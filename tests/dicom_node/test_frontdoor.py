"""The front door under hostile input: raw-socket clients against a real in-process node.

Each case checks that the socket is closed within its deadline (plus slack), that the event is
in the association audit with the peer address and the reason, and that ordinary senders
(DCMTK storescu, pynetdicom) get through while such sockets are open and afterwards.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pydicom
import pynetdicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from dicom_node import dimse_codec, frontdoor
from dicom_node.connection_counts import ConnectionCounts, RemoteCounts, serve_counts
from dicom_node.connection_handoff import Handoff, link_pair
from dicom_node.scp import DicomNode
from dicom_node.scu import Peer, _make_ae, associate
from dicom_node.synthetic import write_ct_study
from tests.support.dicom import dataset_bytes, incoming_files, stored_files
from tests.support.halfstore import half_a_c_store
from tests.support.node import node_settings
from tests.support.pki import make_pki
from tests.support.procs import free_port
from tests.support.waiting import wait_until

from .conftest import NODE_AE, run_tool

ACSE, NETWORK = 1.5, 2.0
SLACK = 1.5
HOSTILE = "127.0.0.2"  # loopback too: a second peer address without a second machine


@pytest.fixture
def guarded(make_node):
    return make_node(acse_timeout=ACSE, network_timeout=NETWORK, max_pdu_size=16384, max_connections_per_host=3)


def connect(node, source: str = HOSTILE, port: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port or node.settings.port))
    return sock


def wait_closed(sock: socket.socket, within: float) -> tuple[float, bytes]:
    """Seconds until the node closed the connection, and what it sent before."""
    start = time.monotonic()
    sock.settimeout(within)
    received = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"connection still open after {within} s") from None
    finally:
        sock.close()
    return time.monotonic() - start, received


def audit_row(node, reason_part: str, host: str = HOSTILE) -> dict:
    def find():
        rows = [r for r in node.index.recent_associations(50) if reason_part in (r["reason"] or "")]
        return rows[0] if rows else None

    try:
        row = wait_until(find, timeout=5, what=f"audit row with {reason_part!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; audit: {[r['reason'] for r in node.index.recent_associations(5)]}") from None
    assert row["peer_host"] == host
    assert row["ended_at"] is not None
    return row


def a_associate_rq_prefix(length: int = 400) -> bytes:
    """The first bytes of an A-ASSOCIATE-RQ that claims `length` bytes: header, version, AE titles."""
    body = b"\x00\x01\x00\x00" + NODE_AE.ljust(16).encode() + b"HALFRQ".ljust(16) + b"\x00" * 32
    return struct.pack(">BBL", 0x01, 0, length) + body


def echo_works(node) -> None:
    ae = _make_ae("ECHOER")
    ae.add_requested_context(Verification)
    assoc = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    try:
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


A_ABORT_PREFIX = b"\x07\x00\x00\x00\x00\x04"


def test_garbage_is_aborted_and_audited(guarded):
    sock = connect(guarded)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")
    elapsed, received = wait_closed(sock, SLACK)
    assert received.startswith(A_ABORT_PREFIX)
    row = audit_row(guarded, "unknown PDU type 0x47")
    assert row["result"] == "aborted"
    echo_works(guarded)


def test_unknown_pdu_type_is_aborted(guarded):
    sock = connect(guarded)
    sock.sendall(struct.pack(">BBL", 0x09, 0, 4) + b"\x00" * 4)
    _, received = wait_closed(sock, SLACK)
    assert received == A_ABORT_PREFIX + b"\x00\x00\x02\x01"  # source: provider, reason: unrecognised PDU
    assert audit_row(guarded, "unknown PDU type 0x09")["result"] == "aborted"


def test_half_an_associate_request_then_silence_is_closed_at_the_acse_deadline(guarded):
    sock = connect(guarded)
    sock.sendall(a_associate_rq_prefix())
    elapsed, _ = wait_closed(sock, ACSE + SLACK)
    assert elapsed < ACSE + SLACK
    row = audit_row(guarded, "no complete A-ASSOCIATE-RQ within acse_timeout")
    assert row["result"] == "aborted" and "bytes" in row["reason"]


def test_silent_connection_is_closed_and_audited(guarded):
    sock = connect(guarded)
    elapsed, _ = wait_closed(sock, ACSE + SLACK)
    assert elapsed < ACSE + SLACK
    assert audit_row(guarded, "no A-ASSOCIATE-RQ within acse_timeout")["result"] == "aborted"


def test_probe_that_connects_and_closes_is_not_audited(guarded):
    connect(guarded).close()
    time.sleep(0.5)
    echo_works(guarded)
    assert [r for r in guarded.index.recent_associations(10) if r["peer_host"] == HOSTILE] == []


@pytest.mark.parametrize("then_stream", [False, True], ids=["then-nothing", "then-stream"])
def test_4_gb_associate_request_is_aborted_without_reading_it(guarded, then_stream):
    sock = connect(guarded)
    sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
    if then_stream:
        chunk = b"\x00" * (1 << 20)
        try:
            for _ in range(64):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed under us: expected
    elapsed, _ = wait_closed(sock, SLACK)
    row = audit_row(guarded, "A-ASSOCIATE-RQ declares 4294967295 bytes")
    assert row["result"] == "aborted"
    echo_works(guarded)


def test_other_pdu_before_the_associate_request_is_aborted(guarded):
    sock = connect(guarded)
    sock.sendall(struct.pack(">BBL", 0x04, 0, 6) + b"\x00\x00\x00\x02\x01\x03")
    wait_closed(sock, SLACK)
    assert audit_row(guarded, "P-DATA-TF before any A-ASSOCIATE-RQ")["result"] == "aborted"


def associated(node, calling: str = "RAWPDATA"):
    ae = _make_ae(calling)
    ae.add_requested_context(Verification)
    assoc = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    audit_id = wait_until(
        lambda: next((r["id"] for r in node.index.recent_associations(5) if r["calling_ae"] == calling), None),
        what="accepted association",
    )
    return assoc, audit_id


def audit_by_id(node, audit_id: int) -> dict:
    return next(r for r in node.index.recent_associations(50) if r["id"] == audit_id)


def test_p_data_over_max_pdu_size_inside_an_association_is_aborted(guarded):
    assoc, audit_id = associated(guarded)
    # Written under pynetdicom's requestor, on its socket: a P-DATA-TF declaring 4 GB.
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\x00" * 1000)
    wait_until(lambda: assoc.is_aborted, timeout=SLACK, what="A-ABORT from the node")
    row = wait_until(lambda: (r := audit_by_id(guarded, audit_id))["result"] == "aborted" and r, what="audit closed")
    assert "P-DATA-TF declares 4294967295 bytes, more than the 16384 accepted" in row["reason"]
    assert row["calling_ae"] == "RAWPDATA" and row["peer_host"] == "127.0.0.1"
    echo_works(guarded)


def test_p_data_of_exactly_max_pdu_size_is_read(guarded):
    """The cap is the size we announced, not less: a P-DATA-TF of exactly max_pdu_size is fine
    (here a dataset fragment without a command: the association goes on)."""
    assoc, audit_id = associated(guarded, "EXACTPDU")
    pdv = struct.pack(">LBB", 16384 - 4, 1, 0x00) + b"\x00" * (16384 - 6)
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
    time.sleep(0.5)
    assert assoc.is_established
    assoc.abort()


def test_pdus_that_arrive_together_are_each_answered(guarded):
    """A read takes whatever has arrived: the second C-ECHO-RQ, read with the first, waits in the
    connection's buffer with nothing left on the socket, and is answered all the same."""
    assoc, _ = associated(guarded, "TWOECHOS")
    context_id = assoc.accepted_contexts[0].context_id
    pdus = b""
    for message_id in (7, 8):
        primitive = C_ECHO()
        primitive.MessageID, primitive.AffectedSOPClassUID = message_id, Verification
        message = C_ECHO_RQ()
        message.primitive_to_message(primitive)
        for p_data in message.encode_msg(context_id, 16384):
            pdu = P_DATA_TF()
            pdu.from_primitive(p_data)
            pdus += pdu.encode()
    # As pynetdicom's send_*() do: our requestor's reactor paused, or it takes the responses.
    assoc._reactor_checkpoint.clear()
    wait_until(lambda: assoc._is_paused, what="requestor's reactor paused")
    assoc.dul.socket.socket.sendall(pdus)  # one segment, both requests
    answered = []
    for _ in range(2):
        _, response = assoc.dimse.get_msg(block=True)  # dimse_timeout bounds the wait
        assert response is not None, f"answered only {answered}"
        answered.append((response.MessageIDBeingRespondedTo, int(response.Status)))
    assoc._reactor_checkpoint.set()
    assert sorted(answered) == [(7, 0), (8, 0)]
    assoc.release()


def test_p_data_over_a_mebibyte_is_read_into_a_buffer_of_its_own(make_node, tmp_path):
    """With max_pdu_size over REUSED_PDU_BUFFER, pynetdicom sends PDUs that large: each is read
    on from what the connection's buffer already took of it, and stored byte-identical."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage

    node = make_node(max_pdu_size=4 << 20)
    _, paths = write_ct_study(tmp_path / "big", 2, rows=1400, cols=1400)  # 3.9 MB each: one PDU
    assert frontdoor.REUSED_PDU_BUFFER < paths[0].stat().st_size < 4 << 20
    ae = _make_ae("BIGPDUS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    assert assoc.acceptor.maximum_length == 4 << 20
    for path in paths:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.release()
    for path in paths:
        sent = pydicom.dcmread(path)
        stored = node.store.path_for(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        assert dataset_bytes(stored) == dataset_bytes(path)


def test_p_data_incomplete_after_network_timeout_is_cut(guarded):
    assoc, audit_id = associated(guarded, "SLOWPDU")
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
    start = time.monotonic()
    wait_until(lambda: assoc.is_aborted, timeout=NETWORK + SLACK, what="connection cut")
    assert time.monotonic() - start < NETWORK + SLACK
    row = wait_until(lambda: (r := audit_by_id(guarded, audit_id))["result"] == "aborted" and r, what="audit closed")
    assert "incomplete" in row["reason"] and "network_timeout" in row["reason"]


def test_too_many_connections_from_one_host(guarded):
    held = [connect(guarded) for _ in range(3)]  # max_connections_per_host=3, all unassociated
    time.sleep(0.2)
    extra = connect(guarded)
    elapsed, received = wait_closed(extra, 1.0)
    assert received == b""
    row = audit_row(guarded, "max_connections_per_host")
    assert row["result"] == "rejected"
    # Another host is not affected, DCMTK or pynetdicom, while the three are open.
    echo_works(guarded)
    run_tool("echoscu", "-aec", NODE_AE, "127.0.0.1", str(guarded.settings.port))
    for sock in held:
        sock.close()
    wait_until(lambda: HOSTILE not in guarded.front_door.counts.per_host(), timeout=ACSE + SLACK, what="slots released")


def test_max_associations_counts_associated_connections_only(make_node):
    node = make_node(acse_timeout=4.0, max_associations=1, max_connections_per_host=4)
    silent = [connect(node, source) for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4")]
    time.sleep(0.2)
    # Three connections that never asked for an association do not take the one slot...
    echo_works(node)
    # ...an association does, and is refused with the reason DICOM has for it; then the slot is free again.
    ae = _make_ae("HOLDER")
    ae.add_requested_context(Verification)
    held = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    try:
        refused = run_tool("echoscu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), check=False)
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stdout + refused.stderr
    finally:
        held.release()
    wait_until(lambda: node.front_door.counts.associations() == 0, timeout=5, what="the slot released")
    run_tool("echoscu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port))
    rows = [r for r in node.index.recent_associations(20) if "max_associations" in (r["reason"] or "")]
    assert len(rows) == 1 and rows[0]["result"] == "rejected"
    for sock in silent:
        sock.close()


def test_a_flood_of_refused_connections_is_audited_with_a_count_not_row_by_row(make_node):
    window = 8.0
    node = make_node(acse_timeout=ACSE, refusal_audit_limit=3, refusal_audit_window_seconds=window)
    flood_started = time.monotonic()
    for _ in range(12):
        sock = connect(node)
        sock.sendall(b"GARBAGE!" * 4)
        wait_closed(sock, ACSE + SLACK)
    rows = lambda: [r for r in node.index.recent_associations(100) if r["peer_host"] == HOSTILE]  # noqa: E731
    wait_until(lambda: len(rows()) == 3, timeout=5, what="three audit rows")
    time.sleep(0.5)
    assert len(rows()) == 3  # the other nine were counted, not written
    echo_works(node)  # other hosts are not throttled
    assert time.monotonic() - flood_started < window, "the flood took longer than the window"
    time.sleep(flood_started + window + 0.2 - time.monotonic())  # the window is over: the next row carries the count
    sock = connect(node)
    sock.sendall(b"GARBAGE!" * 4)
    wait_closed(sock, ACSE + SLACK)
    latest = wait_until(lambda: len(rows()) == 4 and rows()[0], timeout=5, what="a fourth row")
    assert "9 more refusal(s) from this host not audited" in latest["reason"]
    assert "unknown PDU type" in latest["reason"]


def test_storescu_gets_through_while_hostile_sockets_are_open_and_after(make_node, tmp_path):
    node = make_node(acse_timeout=4.0, network_timeout=4.0, max_connections_per_host=8)
    hostile = []
    for source in ("127.0.0.2", "127.0.0.3"):
        a = connect(node, source)
        a.sendall(a_associate_rq_prefix())  # half a request, then silence
        b = connect(node, source)
        b.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))  # a huge header, then nothing
        c = connect(node, source)  # nothing at all
        hostile += [a, b, c]
    _, paths = write_ct_study(tmp_path / "ct", 5)
    run_tool("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    assert len(stored_files(node.settings.storage_dir)) == 5
    for sock in hostile:
        wait_closed(sock, 4.0 + SLACK)
    _, more = write_ct_study(tmp_path / "ct2", 3)
    run_tool("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, more))
    assert len(stored_files(node.settings.storage_dir)) == 8
    reasons = [r["reason"] for r in node.index.recent_associations(50) if r["peer_host"] in ("127.0.0.2", "127.0.0.3")]
    assert len(reasons) == 6


def test_silent_tls_client_does_not_block_the_tls_listener(make_node, tmp_path, monkeypatch):
    """And over TLS each response goes through the DUL thread (no direct send: an SSL object is
    not for two threads at once)."""
    sent_directly = []
    original_send = frontdoor._DirectSend.send

    def spy_send(self, *args):
        sent_directly.append(original_send(self, *args))
        return sent_directly[-1]

    monkeypatch.setattr(frontdoor._DirectSend, "send", spy_send)
    pki = make_pki(tmp_path / "pki")
    node = make_node(
        acse_timeout=3.0, tls_enabled=True, tls_port=free_port(), tls_cert=pki["server.pem"], tls_key=pki["server.key"],
    )
    silent = connect(node, port=node.settings.tls_port)  # no ClientHello
    _, paths = write_ct_study(tmp_path / "ct", 2)
    run_tool("storescu", "+tla", "+cf", str(pki["ca.pem"]), "-aec", NODE_AE, "127.0.0.1", str(node.settings.tls_port),
             *map(str, paths))
    assert len(stored_files(node.settings.storage_dir)) == 2
    assert sent_directly == [False, False]
    wait_closed(silent, 3.0 + SLACK)
    assert audit_row(node, "TLS handshake")["result"] == "rejected"


def test_aborted_transfer_leaves_no_spool_file(guarded, tmp_path):
    """A C-STORE whose association is cut half-way: its spool file in .incoming is removed."""
    assoc = half_a_c_store(Peer("127.0.0.1", guarded.settings.port, NODE_AE), tmp_path)
    wait_until(lambda: list(guarded.store.incoming.glob("*.rx.dcm")), timeout=3, what="spool file")
    # Then a P-DATA-TF that never ends.
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
    wait_until(lambda: assoc.is_aborted, timeout=NETWORK + SLACK, what="connection cut")
    wait_until(lambda: not incoming_files(guarded.store.root), timeout=3, what="spool file removed")


def test_a_received_data_set_is_streamed_to_incoming_not_kept_in_memory(node, tmp_path, monkeypatch):
    seen = []
    original = node.ingestor.ingest_file

    def spy(path, *args, **kwargs):
        seen.append(path.parent)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(node.ingestor, "ingest_file", spy)
    monkeypatch.setattr(node.ingestor, "ingest", lambda *a: pytest.fail("the data set was passed in memory"))
    _, paths = write_ct_study(tmp_path / "ct", 2)
    run_tool("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    assert seen == [node.store.incoming] * 2
    assert len(stored_files(node.settings.storage_dir)) == 2
    assert incoming_files(node.store.root) == []
    # Only the node's own connections stream: the process-wide switch (our C-GET handlers) is off.
    assert _config.STORE_RECV_CHUNKED_DATASET is False


def test_storescu_requests_are_decoded_and_answered_directly_and_stored_whole(node, tmp_path, monkeypatch):
    """DCMTK's C-STORE-RQ commands take the front door's struct decoder, not pynetdicom's, and
    each response is sent directly by the thread that served the request."""
    decoded, sent_directly = [], []
    original_decode, original_send = dimse_codec.store_request, frontdoor._DirectSend.send

    def spy_decode(command):
        request = original_decode(command)
        decoded.append(request)
        return request

    def spy_send(self, *args):
        sent = original_send(self, *args)
        sent_directly.append(sent)
        return sent

    monkeypatch.setattr(dimse_codec, "store_request", spy_decode)
    monkeypatch.setattr(frontdoor._DirectSend, "send", spy_send)
    _, paths = write_ct_study(tmp_path / "ct", 3)
    run_tool("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    assert len(decoded) == 3 and None not in decoded
    assert sent_directly == [True] * 3
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    stored = [pydicom.dcmread(p) for p in stored_files(node.settings.storage_dir)]
    assert sorted(ds.SOPInstanceUID for ds in stored) == sorted(sent)
    for ds in stored:
        assert ds == sent[ds.SOPInstanceUID]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_storescu_data_sets_are_written_straight_to_the_spool_file(node, tmp_path, monkeypatch):
    """Cut into 4 KB PDUs, each data set goes from the received PDU to its spool file without
    pynetdicom's P-DATA decoding, and is stored whole."""
    taken = []
    original = dimse_codec.data_fragments

    def spy(pdu, context_id):
        fragments = original(pdu, context_id)
        taken.append(fragments)
        return fragments

    monkeypatch.setattr(dimse_codec, "data_fragments", spy)
    _, paths = write_ct_study(tmp_path / "ct", 3)
    run_tool("storescu", "--max-send-pdu", "4096", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port),
             *map(str, paths))
    assert None not in taken
    assert [f.last for f in taken].count(True) == 3
    assert len(taken) >= 3 * (min(p.stat().st_size for p in paths) // 4096)
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    stored = [pydicom.dcmread(p) for p in stored_files(node.settings.storage_dir)]
    assert sorted(ds.SOPInstanceUID for ds in stored) == sorted(sent)
    for ds in stored:
        assert ds == sent[ds.SOPInstanceUID]


def test_unchecked_pynetdicom_version_refuses_to_start(monkeypatch):
    monkeypatch.setattr(pynetdicom, "__version__", "3.0.5")
    with pytest.raises(frontdoor.UnsupportedPynetdicom, match="3.0.5"):
        frontdoor.check_pynetdicom()


def thread_cpu_seconds(thread) -> float:
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_association_costs_the_node_no_polling(node):
    """The accepted association's two threads sleep until there is work (event-driven waits);
    pynetdicom's own loops poll every millisecond and burn CPU while the peer says nothing."""
    assoc, _ = associated(node, "IDLEPEER")  # default timeouts: idle for 2 s is allowed
    try:
        def node_threads():
            return [t for t in threading.enumerate() if isinstance(t, (DULServiceProvider, Association))
                    and (t.assoc if isinstance(t, DULServiceProvider) else t).is_acceptor]

        wait_until(lambda: len(node_threads()) == 2, what="the node's two threads of the association")
        threads = node_threads()
        before = {t: thread_cpu_seconds(t) for t in threads}
        time.sleep(2.0)
        spent = {t.name: thread_cpu_seconds(t) - before[t] for t in threads}
        assert all(seconds <= 0.05 for seconds in spent.values()), spent
        assert assoc.send_c_echo().Status == 0x0000  # and it still answers at once
    finally:
        assoc.release()


def test_an_extra_scp_process_without_its_counts_refuses_and_says_why(tmp_path):
    """An extra SCP process whose counts link to the first one is gone cannot count associations:
    a connection passed to it is rejected at its A-ASSOCIATE-RQ, audited with the reason, rather
    than let in uncounted."""
    counts_ours, counts_theirs = socket.socketpair()
    counts_ours.close()
    first_end, extra_end = link_pair()
    node = DicomNode(node_settings(tmp_path, acse_timeout=ACSE), listener_only=True,
                     counts=RemoteCounts(counts_theirs), passed_connections=extra_end)
    node.start()
    handoff = Handoff()
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        assert handoff.wait_ready("scp-process-2", first_end)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        result = {}
        client = threading.Thread(target=lambda: result.update(assoc=ae.associate(
            "127.0.0.1", listener.getsockname()[1], ae_title=NODE_AE)))
        client.start()
        connection, address = listener.accept()  # accepted here, as the first process does
        assert handoff.pass_connection("scp-process-2", connection, "plain", address)
        connection.close()
        client.join(10)
        assert result["assoc"].is_rejected
        row = audit_row(node, "connection limits unavailable", host="127.0.0.1")
        assert row["result"] == "rejected" and "first SCP process does not answer" in row["reason"]
    finally:
        listener.close()
        handoff.remove("scp-process-2")
        node.stop()


def test_a_passed_connection_the_extra_process_cannot_serve_is_released(tmp_path):
    """Counted for the extra process when the first one passed it; if it cannot be served there
    (here: a listener it does not have), its count is released, not held until the process ends."""
    counts = ConnectionCounts(max_per_host=2, max_associations=0)
    counts.join("scp-process-2")
    counts_ours, counts_theirs = socket.socketpair()
    serve_counts(counts, counts_ours, owner="scp-process-2")
    first_end, extra_end = link_pair()
    node = DicomNode(node_settings(tmp_path), listener_only=True, counts=RemoteCounts(counts_theirs),
                     passed_connections=extra_end)
    node.start()
    handoff = Handoff()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        assert handoff.wait_ready("scp-process-2", first_end)
        connection, address = listener.accept()
        assert counts.admit(address[0]) == "scp-process-2"
        assert handoff.pass_connection("scp-process-2", connection, "tls", address)  # it has no TLS listener
        connection.close()
        wait_until(lambda: counts.per_host() == {}, timeout=5, what="the count released")
        client.settimeout(5)
        assert client.recv(1) == b""
    finally:
        client.close()
        listener.close()
        handoff.remove("scp-process-2")
        node.stop()


def test_a_send_to_a_peer_that_stops_reading_fails_within_network_timeout():
    """A plain connection's socket has no Python timeout (its reads keep their own deadlines);
    the kernel's send timeout still bounds each send, so a peer that stops reading cannot hold
    the thread that answers it."""
    node_side, peer = socket.socketpair()
    try:
        frontdoor._prepare_socket(node_side, 0.5)
        assert node_side.gettimeout() is None
        start = time.monotonic()
        with pytest.raises(OSError):
            node_side.sendall(b"\x00" * (64 << 20))  # far beyond both buffers: nobody reads
        assert 0.4 < time.monotonic() - start < 0.5 + SLACK
    finally:
        node_side.close()
        peer.close()


def test_storescu_requests_are_taken_from_the_pdu_and_served_by_the_connection_reader(node, tmp_path, monkeypatch):
    """Each C-STORE-RQ command PDU is decoded where it lies (not through pynetdicom's DUL), and,
    with the association thread idle, the request is served in the reader's (DUL) thread: no
    hand-off to the association thread per instance."""
    serving_threads, commands = [], []
    original_ingest, original_command = node.ingestor.ingest_file, dimse_codec.whole_command

    def spy(*args, **kwargs):
        serving_threads.append(type(threading.current_thread()))
        return original_ingest(*args, **kwargs)

    def spy_command(pdu):
        commands.append(original_command(pdu))
        return commands[-1]

    monkeypatch.setattr(node.ingestor, "ingest_file", spy)
    monkeypatch.setattr(dimse_codec, "whole_command", spy_command)
    _, paths = write_ct_study(tmp_path / "ct", 3)
    run_tool("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.settings.port), *map(str, paths))
    assert len(commands) == 3 and None not in commands
    # The first may arrive while the association thread is still establishing the association:
    # then that thread serves it, after the EVT_ESTABLISHED handlers.
    assert len(serving_threads) == 3 and serving_threads[1:] == [DULServiceProvider] * 2
    assert len(stored_files(node.settings.storage_dir)) == 3


class _StandInAssociation:
    """What ``_serve_here`` reads of an association."""

    def __init__(self) -> None:
        import queue
        from types import SimpleNamespace

        from pynetdicom.timer import Timer

        self._front_door_serving = threading.Lock()
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()
        self.dimse = SimpleNamespace(msg_queue=queue.Queue())
        self.dul = SimpleNamespace(_idle_timer=Timer(30))
        self.is_established, self._kill = True, False
        self.served: list = []

    def _serve_request(self, primitive, context_id) -> None:
        self.served.append((primitive, context_id, self.dul._idle_timer.expired, self._front_door_serving.locked()))


def test_a_request_is_served_in_the_reader_only_while_the_association_thread_has_nothing():
    assoc = _StandInAssociation()
    assert frontdoor._serve_here(assoc, (1, "request"))
    primitive, context_id, idle_expired, locked = assoc.served.pop()
    assert (primitive, context_id, idle_expired, locked) == ("request", 1, False, True)
    assert not assoc._front_door_serving.locked() and assoc.dul._idle_timer.timeout == 30
    # The association thread serving a request, or one queued for it: this one queues behind.
    with assoc._front_door_serving:
        assert not frontdoor._serve_here(assoc, (1, "second"))
    assoc.dimse.msg_queue.put((1, "earlier"))
    assert not frontdoor._serve_here(assoc, (1, "second"))
    assoc.dimse.msg_queue.get()
    assoc._reactor_checkpoint.clear()  # paused by a local send or release: it waits its turn
    assert not frontdoor._serve_here(assoc, (1, "second"))
    assoc._reactor_checkpoint.set()
    assoc.is_established = False  # released or aborted meanwhile: the association thread decides
    assert not frontdoor._serve_here(assoc, (1, "second"))
    assert assoc.served == []


def test_a_request_pynetdicom_aborts_for_while_the_reader_serves_it_ends_the_association(node):
    """pynetdicom aborts the association from ``_serve_request`` when it has no service class
    for a request's SOP class; served in the DUL thread, that abort must not wait for the DUL
    thread to stop (it would wait for itself): the association ends, its threads with it."""
    from io import BytesIO

    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import CTImageStorage

    ae = _make_ae("BADCLASS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = associate(ae, Peer("127.0.0.1", node.settings.port, NODE_AE))
    _, [path] = write_ct_study(node.settings.storage_dir.parent / "badclass", 1)
    assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000  # served; the next by the reader

    request = C_STORE()
    request.MessageID, request.Priority = 2, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = "1.2.3.4.5", generate_uid()
    request.DataSet = BytesIO(b"\x08\x00\x16\x00UI\x06\x001.2.3\x00")  # whatever: it is never read
    assoc.dimse.send_msg(request, assoc.accepted_contexts[0].context_id)
    wait_until(lambda: assoc.is_aborted, timeout=5, what="A-ABORT from the node")

    def node_threads():
        return [t for t in threading.enumerate() if isinstance(t, (DULServiceProvider, Association))
                and (t.assoc if isinstance(t, DULServiceProvider) else t).is_acceptor
                and (t.assoc if isinstance(t, DULServiceProvider) else t).requestor.ae_title == "BADCLASS"]

    wait_until(lambda: not node_threads(), timeout=5, what="the aborted association's threads to end")
    echo_works(node)
