#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run every test suite: the Fluentd plugin's Ruby tests
# (against the real sidecar), then the Python tests (pytest's summary closes the run).
# Plugin tests inside Fluentd itself run when FLUENTD_SOURCE and SERVERENGINE_SOURCE
# point to source checkouts (fluentd-plugin/README.md); otherwise they are omitted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
(cd fluentd-plugin && LOGSCORE_PYTHON="$PWD/../.venv/bin/python" rake test)
.venv/bin/python -m pytest "$@"
