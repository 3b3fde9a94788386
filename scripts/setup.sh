#!/usr/bin/env bash
# Install what the node needs on a fresh Debian machine: Debian packages (Redis, Orthanc,
# DCMTK, dicom3tools, PostgreSQL and Chromium with its driver for the tests) and a virtual environment in .venv with the
# project installed.
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(redis-server orthanc orthanc-dicomweb dcmtk dicom3tools openssl iproute2 util-linux postgresql chromium chromium-driver)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # The packages' own services are not wanted: tests and the quickstart start their own on loopback.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing the project into .venv (torch pinned to the CPU build 2.13.0)"
  .venv/bin/pip install -q --upgrade pip
  # Pinned first and alone: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[ml,test,postgres]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# checkov (tests/chart scans the rendered chart and the Dockerfiles) pins dependencies that clash
# with the project's, so it gets a virtual environment of its own.
CHECKOV_VERSION=3.3.30
if [ ! -f ".venv-checkov/.installed-$CHECKOV_VERSION" ]; then
  echo "setup: installing checkov $CHECKOV_VERSION into .venv-checkov"
  rm -rf .venv-checkov
  "$PYTHON" -m venv .venv-checkov
  .venv-checkov/bin/pip install -q "checkov==$CHECKOV_VERSION"
  touch ".venv-checkov/.installed-$CHECKOV_VERSION"
fi
