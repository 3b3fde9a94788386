"""scp_processes: several SCP processes behind one port (the first accepts and passes each
connection to the one holding the fewest), dying with the first, and the front door's limits
counted for the whole node."""

from __future__ import annotations

import logging
import os
import sys
import signal
import socket
import subprocess
import time
import urllib.request

import psutil
from pynetdicom.sop_class import Verification

from dicom_node import scp_processes
from dicom_node.connection_counts import ConnectionCounts
from dicom_node.connection_handoff import Handoff
from dicom_node.netutil import client_tls_context
from dicom_node.scu import Peer, _make_ae, associate
from dicom_node.index import Index
from dicom_node.synthetic import write_ct_study
from tests.support.dicom import incoming_files, stored_files
from tests.support.halfstore import half_a_c_store
from tests.support.node import node_settings
from tests.support.pki import make_pki
from tests.support.procs import REPO, child_pids, free_port, start_node, stop, wait_for_port
from tests.support.waiting import wait_until

from .conftest import NODE_AE, require_tool


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_two_scp_processes_share_the_port_and_die_with_the_first(tmp_path):
    require_tool("storescu")
    _, paths = write_ct_study(tmp_path / "input", 40, rows=64, cols=64)
    folders = []
    for part in range(8):
        folder = tmp_path / f"part{part}"
        folder.mkdir()
        for path in paths[part::8]:
            os.link(path, folder / path.name)
        folders.append(folder)
    root, port = tmp_path / "node", free_port()
    http_port = free_port()
    node = start_node(root, port, extra_env={"DICOM_NODE_SCP_PROCESSES": "2", "DICOM_NODE_HTTP_PORT": str(http_port)})
    try:
        wait_for_port(port, proc=node)
        extra = wait_until(lambda: child_pids(node.pid), timeout=20, what="the second SCP process")
        assert len(extra) == 1
        wait_until(lambda: "scp.process_ready" in (root / "serve.log").read_text(), timeout=20,
                   what="the second SCP process listening")

        # Eight associations at once; the first process serves some and passes the others on.
        senders = [
            subprocess.Popen(["storescu", "-aec", NODE_AE, "+sd", "127.0.0.1", str(port), str(folder)],
                             env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for folder in folders
        ]
        for sender in senders:
            _, err = sender.communicate(timeout=120)
            assert sender.returncode == 0, err.decode()
        assert len(stored_files(root / "store")) == 40
        index = Index(f"sqlite:///{root / 'index.db'}")
        try:
            assert index.counts()["instances"] == 40
        finally:
            index.dispose()
        # /metrics (served by the first process) counts the instances both processes took.
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'dicom_node_instances_total{outcome="accepted"} 40.0' in metrics, metrics

        node.send_signal(signal.SIGKILL)
        node.wait()
        wait_until(lambda: not alive(extra[0]), timeout=10, what="the second SCP process to die with the first")
        # The leader thread shows "Z" while its other threads may still hold the socket for a moment.
        wait_until(lambda: not listening(port), timeout=10, what="nothing listening on the port")
    finally:
        stop(node)  # SIGTERM: the first process stops the others


def still_open(sock: socket.socket, wait: float) -> bool:
    """Whether the node keeps `sock` open for `wait` seconds (a refused one is closed at once)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False


def silent_connections(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


def test_serve_stops_cleanly_with_its_extra_processes(tmp_path):
    """SIGTERM: every process stops at once and none takes the stop for a lost link (which would
    wait for its associations, log an error and exit 1)."""
    root, port = tmp_path / "node", free_port()
    node = start_node(root, port, extra_env={"DICOM_NODE_SCP_PROCESSES": "2"})
    try:
        wait_for_port(port, proc=node)
        wait_until(lambda: "scp.process_ready" in (root / "serve.log").read_text(), timeout=20,
                   what="the second SCP process ready")
        extra = child_pids(node.pid)[0]
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=10) == 0
        assert not alive(extra)
        log = (root / "serve.log").read_text()
        assert "scp.process_lost_its_link" not in log and "scp.process_exited" not in log
    finally:
        stop(node)


def established(pid: int, ports: tuple[int, ...]) -> int:
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port in ports
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def test_connections_are_spread_evenly_over_the_scp_processes(tmp_path):
    """The kernel's SO_REUSEPORT hash put 3 of 4 connections on one of 2 processes in 13 of 20
    trials; passed by the first process, each goes to the one holding the fewest, TLS included
    (the handshake is the serving process's)."""
    pki = make_pki(tmp_path / "pki")
    root, port, tls_port = tmp_path / "node", free_port(), free_port()
    node = start_node(root, port, extra_env={
        "DICOM_NODE_SCP_PROCESSES": "2", "DICOM_NODE_TLS_ENABLED": "true", "DICOM_NODE_TLS_PORT": str(tls_port),
        "DICOM_NODE_TLS_CERT": str(pki["server.pem"]), "DICOM_NODE_TLS_KEY": str(pki["server.key"])})
    associations = []
    try:
        wait_for_port(tls_port, proc=node)
        extra = wait_until(lambda: child_pids(node.pid), timeout=20, what="the second SCP process")[0]
        wait_until(lambda: "scp.process_ready" in (root / "serve.log").read_text(), timeout=20,
                   what="the second SCP process ready")
        for peer_port, tls in ((port, None), (port, None), (tls_port, client_tls_context(pki["ca.pem"])),
                               (tls_port, client_tls_context(pki["ca.pem"]))):
            ae = _make_ae("MODALITY")
            ae.add_requested_context(Verification)
            associations.append(associate(ae, Peer("127.0.0.1", peer_port, NODE_AE), tls))
        assert all(assoc.send_c_echo().Status == 0x0000 for assoc in associations)
        assert (established(node.pid, (port, tls_port)), established(extra, (port, tls_port))) == (2, 2)
        assert established(extra, (tls_port,)) == 1
    finally:
        for assoc in associations:
            assoc.release()
        stop(node)


def test_connection_limits_count_over_all_scp_processes(tmp_path):
    root, port = tmp_path / "node", free_port()
    node = start_node(root, port, extra_env={
        "DICOM_NODE_SCP_PROCESSES": "2", "DICOM_NODE_MAX_CONNECTIONS_PER_HOST": "2", "DICOM_NODE_ACSE_TIMEOUT": "60"})
    try:
        wait_for_port(port, proc=node)
        wait_until(lambda: "scp.process_ready" in (root / "serve.log").read_text(), timeout=20,
                   what="the second SCP process listening")
        # Eight silent connections from one host, spread over both processes: counted per
        # process, four would stay open.
        socks = silent_connections(port, 8)
        time.sleep(0.5)
        kept = [sock for sock in socks if still_open(sock, 1.0)]
        assert len(kept) == 2, f"{len(kept)} connections from one host kept open, max_connections_per_host 2"
        for sock in socks:
            sock.close()

        # An extra process killed while it holds connections: what it held is freed with it...
        time.sleep(0.5)
        held = silent_connections(port, 2)
        extra = child_pids(node.pid)[0]
        os.kill(extra, signal.SIGKILL)
        wait_until(lambda: not alive(extra), timeout=10, what="the second SCP process gone")
        for sock in held:
            sock.close()
        # ...and the first process starts it again.
        restarted = wait_until(lambda: [pid for pid in child_pids(node.pid) if pid != extra], timeout=20,
                               what="the second SCP process started again")
        wait_until(lambda: (root / "serve.log").read_text().count("scp.process_ready") == 2, timeout=20,
                   what="the restarted process listening")
        assert "scp.process_exited" in (root / "serve.log").read_text()
        assert len(restarted) == 1
        again = silent_connections(port, 4)
        time.sleep(0.5)
        assert sum(still_open(sock, 1.0) for sock in again) == 2
        for sock in again:
            sock.close()
        assert node.poll() is None
    finally:
        stop(node)


def test_a_killed_extra_process_leaves_no_spool_file_and_a_workers_files_are_kept(tmp_path):
    """What a killed extra process was receiving is removed when it is started again; files of
    another live process in the same .incoming (an io worker retrieving priors) are never touched,
    neither then nor by a start of serve."""
    root, port = tmp_path / "node", free_port()
    incoming = root / "store" / ".incoming"
    incoming.mkdir(parents=True)
    worker = subprocess.Popen([sys.executable, "-c", WORKER_WRITING, str(incoming)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    node = None
    try:
        assert worker.stdout.readline().strip() == "written"
        workers_files = set(incoming_files(root / "store"))
        node = start_node(root, port, extra_env={"DICOM_NODE_SCP_PROCESSES": "2", "DICOM_NODE_NETWORK_TIMEOUT": "120"})
        wait_for_port(port, proc=node)
        wait_until(lambda: "scp.process_ready" in (root / "serve.log").read_text(), timeout=20,
                   what="the second SCP process ready")
        assert set(incoming_files(root / "store")) == workers_files  # serve's start left them alone
        extra = child_pids(node.pid)[0]
        assoc = half_a_c_store(Peer("127.0.0.1", port, NODE_AE), tmp_path)  # the first connection goes to the extra process
        spool = wait_until(lambda: set(incoming.glob("*.rx.dcm")) - workers_files, timeout=5, what="its spool file")
        os.kill(extra, signal.SIGKILL)
        wait_until(lambda: (root / "serve.log").read_text().count("scp.process_ready") == 2, timeout=20,
                   what="the extra process started again")
        wait_until(lambda: not any(path.exists() for path in spool), timeout=5, what="its spool file removed")
        assert set(incoming_files(root / "store")) == workers_files
        assoc.abort()
    finally:
        if node:
            stop(node)
        worker.kill()
        worker.wait()


WORKER_WRITING = """
import sys, time
from pathlib import Path
from dicom_node.incoming_owner import new_path
new_path(Path(sys.argv[1]), ".rx.dcm").write_bytes(b"a prior being retrieved")
print("written", flush=True)
time.sleep(600)
"""


def test_an_extra_process_that_cannot_start_is_tried_again_with_a_back_off(tmp_path, monkeypatch, caplog):
    """No real process here: an interpreter that is not there makes each start fail (OSError)."""
    monkeypatch.setattr(scp_processes.sys, "executable", str(tmp_path / "no-such-python"))
    monkeypatch.setattr(scp_processes, "RESTART_DELAY", 0.05)
    caplog.set_level(logging.ERROR, logger="dicom_node.scp_processes")
    listeners = scp_processes.ExtraListeners(node_settings(tmp_path, scp_processes=2), ConnectionCounts(8, 16),
                                             Handoff())
    listeners.start()
    try:
        wait_until(lambda: sum(r.getMessage() == "scp.process_start_failed" for r in caplog.records) >= 3,
                   timeout=10, what="three failed starts, each logged")
    finally:
        started = time.monotonic()
        listeners.stop()
    assert time.monotonic() - started < 2  # stop does not wait out a back-off
    assert not any(thread.is_alive() for thread in listeners._threads)
