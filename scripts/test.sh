#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run every test suite: the Fluentd plugin's Ruby tests
# (against the real sidecar), then the Python tests (pytest's summary closes the run).
# Real shippers: when ../shared/vendor holds Fluentd, serverengine and Fluent Bit (see its
# README), the tests run the plugin inside real fluentd processes and Fluent Bit through the
# sidecar's forward mode; FLUENTD_SOURCE, SERVERENGINE_SOURCE and FLUENT_BIT point elsewhere.
# Without them those tests are omitted or skipped, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
vendor="$(cd .. && pwd)/shared/vendor"
if [ -d "$vendor" ]; then
  export FLUENTD_SOURCE=${FLUENTD_SOURCE:-$vendor/fluentd}
  export SERVERENGINE_SOURCE=${SERVERENGINE_SOURCE:-$vendor/serverengine}
  export FLUENT_BIT=${FLUENT_BIT:-$vendor/fluent-bit/bin/fluent-bit}
fi
LOGSCORE_WITH_SHIPPERS=$([ -n "${FLUENTD_SOURCE:-}${FLUENT_BIT:-}" ] && echo 1 || echo 0) bash scripts/setup.sh
(cd fluentd-plugin && LOGSCORE_PYTHON="$PWD/../.venv/bin/python" rake test)
.venv/bin/python -m pytest "$@"
