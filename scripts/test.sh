#!/usr/bin/env bash
# The test command: installs what is missing (scripts/setup.sh), then runs the whole suite
# against real Redis, Orthanc and DCMTK. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TCP_NODELAY=1
# Orthanc 1.10 binds 0.0.0.0 with no option to change it, so the suite runs in a private
# network namespace that holds only loopback: no test traffic can leave the machine.
if [ "$(ip -o link show | awk -F': ' '{print $2}')" = "lo" ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
exec $SUDO unshare --net -- sh -c 'ip link set lo up && exec "$0" -m pytest -q "$@"' .venv/bin/python "$@"
