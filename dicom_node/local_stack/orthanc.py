"""A real Orthanc (Debian package) as the hospital PACS, on loopback ports of its own.

Orthanc 1.10 binds 0.0.0.0 and has no bind option, so it may only run inside a private
network namespace holding nothing but loopback: scripts/test.sh and scripts/quickstart.sh
run in one (`unshare -n`). `require_private_network()` refuses to start Orthanc anywhere else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .procs import free_port, stop, wait_for_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ROUTING_LUA = Path(__file__).resolve().parents[2] / "deploy" / "orthanc" / "routing.lua"


def routing_lua(from_aet: str, to_modality: str) -> str:
    """The site routing rule (deploy/orthanc/routing.lua) with its two settings filled in."""
    return f"ROUTE_FROM_AET = {from_aet!r}\nROUTE_TO = {to_modality!r}\n" + ROUTING_LUA.read_text()


def in_private_network() -> bool:
    return sorted(name for _, name in socket.if_nameindex()) == ["lo"]  # this process's namespace


def run_in_private_network() -> None:
    """Benchmarks: re-run this same command inside `unshare -n` with loopback up, unless already
    there (scripts/test.sh does the same for the suite)."""
    if in_private_network():
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    command = [*sudo, "unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, *sys.argv]
    os.execvp(command[0], command)


def require_private_network() -> None:
    if not in_private_network():
        interfaces = sorted(name for _, name in socket.if_nameindex())
        raise RuntimeError(
            f"Orthanc binds 0.0.0.0; refusing to start it with network interfaces {interfaces}. "
            "Run it through scripts/test.sh or scripts/quickstart.sh, which use a private network namespace (unshare -n)."
        )


@dataclass
class Orthanc:
    """A running Orthanc; `modalities` maps a name to (AE title, host, port), or to Orthanc's object
    form ({"AET": ..., "Host": ..., "Port": ..., "UseDicomTls": true, ...}), passed through as is.

    With `tls_cert` and `tls_key` its DICOM port speaks DICOM TLS only (Orthanc has one DICOM port);
    the same certificate serves its outgoing (SCU) associations to modalities with "UseDicomTls".
    `tls_trusted` is the PEM bundle it trusts, both ways; `tls_require_peer_cert` makes it refuse
    peers without a certificate (DCMTK --require-peer-cert)."""

    root: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int] | dict] = field(default_factory=dict)
    lua: str = ""
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_trusted: Path | None = None
    tls_require_peer_cert: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict:
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: value if isinstance(value, dict) else list(value) for name, value in self.modalities.items()},
            "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LuaScripts": [str(self.root / "routing.lua")] if self.lua else [],
        }
        if self.tls_cert or self.tls_key:
            if not (self.tls_cert and self.tls_key):
                raise ValueError("Orthanc DICOM TLS needs both tls_cert and tls_key")
            config.update({
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(Path(self.tls_cert).resolve()),
                "DicomTlsPrivateKey": str(Path(self.tls_key).resolve()),
                "DicomTlsRemoteCertificateRequired": self.tls_require_peer_cert,
            })
            if self.tls_trusted:
                config["DicomTlsTrustedCertificates"] = str(Path(self.tls_trusted).resolve())
        return config

    def start(self) -> "Orthanc":
        require_private_network()
        self.root = self.root.resolve()  # Orthanc resolves relative paths against its config file
        if shutil.which("Orthanc") is None:
            raise RuntimeError("Orthanc not found: apt-get install orthanc orthanc-dicomweb")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.lua:
            (self.root / "routing.lua").write_text(self.lua)
        (self.root / "orthanc.json").write_text(json.dumps(self.config(), indent=2))
        log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen(
            ["Orthanc", str(self.root / "orthanc.json")],
            env=dict(os.environ, TCP_NODELAY="1"),
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives the quickstart command that started it
        )
        wait_for_port(self.http_port, timeout=30, proc=self.proc)
        wait_for_port(self.dicom_port, timeout=30, proc=self.proc)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise TimeoutError("Orthanc REST API did not come up")

    def log_tail(self, lines: int = 15) -> str:
        """The end of Orthanc's log: what it said about a transfer that failed."""
        try:
            return "\n".join((self.root / "orthanc.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no Orthanc log: {exc})"

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    # --- REST helpers for assertions -------------------------------------------------------

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes | dict | str):
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
            return json.loads(payload) if payload else None

    def upload(self, path: Path) -> dict:
        return self.post("/instances", path.read_bytes())

    def studies(self) -> list[dict]:
        return [self.get(f"/studies/{orthanc_id}") for orthanc_id in self.get("/studies")]

    def instances_of_study(self, study_uid: str) -> list[dict]:
        matches = self.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
        return matches

    def instance_file(self, orthanc_id: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{orthanc_id}/file", timeout=30) as response:
            return response.read()
