"""TLS to peers checks that the peer's certificate names the host dialled, unless that peer's
check_hostname is off; a mismatch says which names the certificate carries and which host was dialled.

DICOM TLS against the node's own TLS listener; https (DICOMweb) against a small https server."""

from __future__ import annotations

import http.server
import ssl
import threading

import pytest
import requests

from dicom_node.netutil import client_tls_context, https_session
from dicom_node.scu import AssociationFailed, Peer, echo
from tests.support.pki import make_pki
from tests.support.procs import free_port

from .conftest import NODE_AE


@pytest.fixture(scope="module")
def pkis(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("pki")
    return {
        "loopback": make_pki(root / "loopback"),  # DNS:localhost, IP:127.0.0.1
        "misnamed": make_pki(root / "misnamed", names=("pacs.hospital.example", "10.1.2.3")),
        "other": make_pki(root / "other"),
    }


def tls_node(make_node, files: dict):
    return make_node(tls_enabled=True, tls_port=free_port(), tls_cert=files["server.pem"], tls_key=files["server.key"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_certificate_naming_the_host_dialled_is_accepted(make_node, pkis, host):
    node = tls_node(make_node, pkis["loopback"])
    assert echo(Peer(host, node.settings.tls_port, NODE_AE), tls_context=client_tls_context(pkis["loopback"]["ca.pem"])) == 0


def test_certificate_for_another_host_is_refused_naming_both(make_node, pkis):
    node = tls_node(make_node, pkis["misnamed"])
    port = node.settings.tls_port
    peer = Peer("127.0.0.1", port, NODE_AE)

    with pytest.raises(AssociationFailed) as raised:
        echo(peer, tls_context=client_tls_context(pkis["misnamed"]["ca.pem"]))

    message = str(raised.value)
    assert message.startswith(f"DICOM TLS handshake with {NODE_AE}@127.0.0.1:{port} failed: the peer's certificate is "
                              "not issued for the host dialled, '127.0.0.1': it names DNS:pacs.hospital.example, "
                              "IP:10.1.2.3, CN=server."), message
    assert "check_hostname" in message

    # The same peer with hostname checking off connects; the chain is still checked.
    assert echo(peer, tls_context=client_tls_context(pkis["misnamed"]["ca.pem"], check_hostname=False)) == 0
    with pytest.raises(AssociationFailed, match="certificate is not trusted"):
        echo(peer, tls_context=client_tls_context(pkis["other"]["ca.pem"], check_hostname=False))


@pytest.fixture
def https_server(pkis):
    """An https server with the misnamed certificate, answering 200 to every GET."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pkis["misnamed"]["server.pem"], pkis["misnamed"]["server.key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_https_peer_hostname_checked_unless_turned_off(https_server, pkis, monkeypatch):
    # requests would let this override the peer's CA bundle; the configured CA must win.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pkis["other"]["ca.pem"]))
    ca = pkis["misnamed"]["ca.pem"]
    with pytest.raises(requests.exceptions.SSLError, match="IP address mismatch, certificate is not valid for '127.0.0.1'"):
        https_session(ca).get(https_server, timeout=10)
    assert https_session(ca, check_hostname=False).get(https_server, timeout=10).text == "ok"
    with pytest.raises(requests.exceptions.SSLError):  # still verified against the CA
        https_session(pkis["other"]["ca.pem"], check_hostname=False).get(https_server, timeout=10)


def test_tls_only_opens_no_plain_listener(make_node, pkis, tmp_path):
    """port 0 (the chart's tls.only): the node listens on its TLS port and the HTTP port, and opens
    no plain DICOM listener at all."""
    import psutil
    from pydantic import ValidationError

    from tests.support.node import node_settings

    def listening() -> set[int]:
        return {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}

    with pytest.raises(ValidationError, match="port 0 turns the plain DICOM listener off"):
        node_settings(tmp_path, port=0)
    before = listening()
    node = make_node(port=0, tls_enabled=True, tls_port=free_port(), tls_cert=pkis["loopback"]["server.pem"],
                     tls_key=pkis["loopback"]["server.key"])
    assert echo(Peer("127.0.0.1", node.settings.tls_port, NODE_AE),
                tls_context=client_tls_context(pkis["loopback"]["ca.pem"])) == 0
    assert listening() - before == {node.settings.tls_port, node.settings.http_port}
