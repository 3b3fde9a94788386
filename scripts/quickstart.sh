#!/usr/bin/env bash
# The quickstart: installs what is missing, then runs the whole product end to end on this
# machine (Redis, Orthanc as the PACS, the node and its workers) and prints the result.
# `scripts/quickstart.sh --stop` stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--stop" ]; then
  exec .venv/bin/dicom-node quickstart --stop
fi
# Orthanc 1.10 binds 0.0.0.0: everything runs in a private network namespace with only loopback.
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
exec $SUDO unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/dicom-node quickstart "$@"' quickstart "$@"
