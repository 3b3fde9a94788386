"""Who may use the HTTP service: a bearer token from a file, a login cookie for browsers, and
loopback only when no token is configured. Real uvicorn servers on loopback ports."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest

from dicom_node.http_api import StatusServer
from dicom_node.index import Index
from dicom_node.web.auth import COOKIE, TokenError, bind_host
from tests.support.node import node_settings
from tests.support.procs import free_port

TOKEN = "s3cret-token-for-the-tests-0123"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


OPENER = urllib.request.build_opener(NoRedirect)


def get(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(host: str = "127.0.0.1", **overrides) -> StatusServer:
        settings = node_settings(tmp_path, work_dir=tmp_path / "jobs", broker_url=f"redis://127.0.0.1:{free_port()}/0",
                                 http_host=host, **overrides)
        index = Index(settings.database_url)
        server = StatusServer(index, settings.http_host, settings.http_port, settings)
        server.start()
        servers.append((server, index))
        return server

    yield start
    for server, index in servers:
        server.stop()
        index.dispose()


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def test_a_token_is_required_except_for_probes_and_metrics(serve, token_file):
    server = serve(http_token_file=token_file)
    base = f"http://127.0.0.1:{server.port}"
    for path in ("/", "/jobs", "/status", "/jobs/abc"):
        code, headers, body = get(base + path)
        assert code == 401 and headers["www-authenticate"] == "Bearer", path
        assert "bearer token" in json.loads(body)["error"]
        assert get(base + path, {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
    assert get(base + "/status", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert get(base + "/jobs", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert get(base + "/healthz")[0] == 200
    assert get(base + "/readyz")[0] in (200, 503)  # answered without a token (the broker is down here)
    code, _, body = get(base + "/metrics")
    assert code == 200 and b"dicom_node_stage_seconds" in body


def test_a_browser_logs_in_with_the_form_and_a_rotated_token_logs_it_out(serve, token_file):
    server = serve(http_token_file=token_file)
    base = f"http://127.0.0.1:{server.port}"
    code, headers, _ = get(base + "/jobs", {"Accept": "text/html"})
    assert code == 303 and headers["location"] == "/login?next=/jobs"
    form = urllib.parse.urlencode({"token": "not it, not it, not it", "next": "/jobs"}).encode()
    assert get(base + "/login", data=form)[0] == 401
    form = urllib.parse.urlencode({"token": TOKEN, "next": "/jobs"}).encode()
    code, headers, _ = get(base + "/login", data=form)
    assert code == 303 and headers["location"] == "/jobs"
    cookie = headers["set-cookie"].split(";")[0]
    assert cookie.startswith(COOKIE + "=") and TOKEN not in cookie and "HttpOnly" in headers["set-cookie"]
    assert get(base + "/jobs", {"Cookie": cookie})[0] == 200
    # An open redirect through ?next= is not possible.
    form = urllib.parse.urlencode({"token": TOKEN, "next": "//evil.example/"}).encode()
    assert get(base + "/login", data=form)[1]["location"] == "/"
    # The Secret is rotated: the file changes, the old cookie and token stop working, the new one works.
    token_file.write_text("a-brand-new-token-after-rotation\n")
    assert get(base + "/jobs", {"Cookie": cookie})[0] == 401
    assert get(base + "/jobs", {"Authorization": f"Bearer {TOKEN}"})[0] == 401
    assert get(base + "/jobs", {"Authorization": "Bearer a-brand-new-token-after-rotation"})[0] == 200


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_without_a_token_it_listens_on_loopback_only_and_says_so(serve, caplog):
    caplog.set_level(logging.WARNING, logger="dicom_node.http_api")
    server = serve(host="0.0.0.0")
    assert server.host == "127.0.0.1"
    warning = [r for r in caplog.records if r.getMessage() == "http.loopback_only"]
    assert warning and "DICOM_NODE_HTTP_TOKEN_FILE" in warning[0].event_fields["reason"]
    assert get(f"http://127.0.0.1:{server.port}/jobs")[0] == 200  # on loopback nothing is asked
    address = _non_loopback_address()
    if address:  # in a private network namespace there is no other address to try
        with pytest.raises(OSError):
            socket.create_connection((address, server.port), timeout=2).close()


def test_with_a_token_the_configured_host_is_used():
    assert bind_host("0.0.0.0", token_configured=True) == ("0.0.0.0", None)
    assert bind_host("::1", token_configured=False) == ("::1", None)
    host, warning = bind_host("10.1.2.3", token_configured=False)
    assert host == "127.0.0.1" and "10.1.2.3" in warning


def test_a_short_or_missing_token_file_stops_the_service_at_start(serve, tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(TokenError, match="shorter than 16"):
        serve(http_token_file=short)
    with pytest.raises(TokenError, match="missing-token"):
        serve(http_token_file=tmp_path / "missing-token")


def test_serve_stops_at_once_when_the_http_port_is_taken(tmp_path):
    """The HTTP service starts first: a port in use stops `dicom-node serve` before the SCP listens."""
    import os
    import subprocess
    import sys

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    dicom_port = free_port()
    env = dict(os.environ, DICOM_NODE_HTTP_PORT=str(taken.getsockname()[1]), DICOM_NODE_PORT=str(dicom_port),
               DICOM_NODE_HOST="127.0.0.1", DICOM_NODE_STORAGE_DIR=str(tmp_path / "store"),
               DICOM_NODE_DATABASE_URL=f"sqlite:///{tmp_path / 'index.db'}", DICOM_NODE_LOG_FORMAT="text")
    try:
        result = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--no-dispatch"], env=env,
                                capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert result.returncode != 0
    assert f"did not start on 127.0.0.1:{env['DICOM_NODE_HTTP_PORT']}" in result.stderr
    assert "scp.listening" not in result.stderr
