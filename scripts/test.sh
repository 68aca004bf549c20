#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run every test suite: the Fluentd plugin's Ruby tests
# (against the real sidecar) beside the Python tests; a last line gives both verdicts.
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
# The Python tests too mostly wait on the processes they start (load 0.8 over 662 s in one
# process): two pytest processes, a test file each at a time (its module fixtures made once),
# took 380 s. LOGSCORE_TEST_WORKERS=0 runs them in this one (for pdb). (Unset once read: a
# sidecar the tests start warns of a LOGSCORE_ variable that names no setting.)
workers=${LOGSCORE_TEST_WORKERS:-2}
unset LOGSCORE_TEST_WORKERS
parallel=()
[ "$workers" != 0 ] && parallel=(-n "$workers" --dist loadfile)
# The Ruby tests mostly wait on Fluentd and sidecar processes (about 60 s of CPU in 190 s), so
# they run beside pytest; their output follows pytest's, and a failure in either fails the run.
ruby_log="$(mktemp)"
ruby_tests=""
# The Ruby suite runs in a process group of its own (set -m), so that stopping this script stops
# rake, its ruby and the Fluentd and sidecar processes the tests started, not rake alone.
stop_ruby_tests() { [ -n "$ruby_tests" ] && kill -- "-$ruby_tests" 2>/dev/null || true; rm -f "$ruby_log"; }
trap stop_ruby_tests EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
set -m
(cd fluentd-plugin && LOGSCORE_PYTHON="$PWD/../.venv/bin/python" rake test) >"$ruby_log" 2>&1 &
ruby_tests=$!
set +m
python_status=0
.venv/bin/python -m pytest "${parallel[@]}" "$@" || python_status=$?
ruby_status=0
wait "$ruby_tests" || ruby_status=$?
ruby_tests=""  # reaped: its number may be another process's now
echo "== the Fluentd plugin's Ruby tests (ran beside pytest) =="
cat "$ruby_log"
verdict() { [ "$1" -eq 0 ] && echo passed || echo "FAILED (exit $1)"; }
echo "[test] Python tests: $(verdict "$python_status"); Ruby tests: $(verdict "$ruby_status")"
[ "$python_status" -eq 0 ] && [ "$ruby_status" -eq 0 ]
