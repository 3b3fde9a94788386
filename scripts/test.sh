#!/usr/bin/env bash
# The test command: installs what is missing (scripts/setup.sh), then runs the whole suite
# against real Redis, Orthanc and DCMTK. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TCP_NODELAY=1
exec .venv/bin/python -m pytest -q "$@"
