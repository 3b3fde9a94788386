"""A throw-away PKI for DICOM TLS tests: a CA and a server and a client certificate it signed (openssl)."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def make_pki(folder: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> dict[str, Path]:
    """Write ca.pem/ca.key, server.pem/server.key and client.pem/client.key under `folder` (created).

    Both certificates carry `names` as subjectAltName (IP addresses as IP entries, others as DNS), so
    hostname checking passes when the tests dial 127.0.0.1 or localhost; pass other names for a
    certificate issued for another host. Returns the files by name ("ca.pem", "server.key", ...).
    Call it twice with two folders for two unrelated CAs (a peer that trusts the wrong CA)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found: apt-get install openssl")  # CI installs it: missing fails, never skips
    d = Path(folder)
    d.mkdir(parents=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
             "-days", "2", "-subj", f"/CN=Test CA {d.name}")
    sans = ",".join(f"IP:{n}" if _is_ip(n) else f"DNS:{n}" for n in names)
    (d / "leaf.ext").write_text(f"subjectAltName = {sans}\nbasicConstraints = CA:FALSE\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
                 "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "2", "-extfile", str(d / "leaf.ext"))
    return {p.name: p for p in d.iterdir()}
