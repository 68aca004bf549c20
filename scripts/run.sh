#!/usr/bin/env bash
# Set up, start the sidecar on the default model (models/apache-access.onnx), show the scores
# of an example access log through it, then keep serving until Ctrl-C.
#   gRPC: unix:/tmp/logscore.sock    HTTP: http://127.0.0.1:9095 (/v1/score, /metrics, /readyz)
set -euo pipefail
cd "$(dirname "$0")/.."
LOGSCORE_WITH_RUBY=${LOGSCORE_WITH_RUBY:-0} LOGSCORE_WITH_BROWSER_AND_DB=${LOGSCORE_WITH_BROWSER_AND_DB:-0} bash scripts/setup.sh

socket=${LOGSCORE_SOCKET:-/tmp/logscore.sock}
http=${LOGSCORE_HTTP:-127.0.0.1:9095}
ready() { .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://$http/readyz', timeout=1)" 2>/dev/null; }
# A sidecar already serving there would pass the readiness check below for this one, which then
# fails to listen after the example's scores were asked of a socket nobody serves.
if ready; then
  echo "a sidecar already answers on http://$http: stop it, or set LOGSCORE_HTTP and LOGSCORE_SOCKET to free ones" >&2
  exit 1
fi
.venv/bin/logscore serve --models-dir models --socket "$socket" --http "$http" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM

for _ in $(seq 100); do
  if ready; then
    break
  fi
  kill -0 $server 2>/dev/null || { echo "the sidecar did not start" >&2; exit 1; }
  sleep 0.2
done

echo "== scores of examples/access.log through the sidecar (gRPC, $socket):" >&2
.venv/bin/logscore client --socket "$socket" --explain 2 examples/access.log
echo "== the same over HTTP/JSON, one event:" >&2
.venv/bin/python - "$http" <<'PY'
import json, sys, urllib.request
line = '203.0.113.5 - - [20/May/2015:10:00:00 +0000] "GET /style2.css?id=1%27%20OR%201%3D1-- HTTP/1.1" 200 4877 "-" "curl/8.0"'
request = urllib.request.Request(f"http://{sys.argv[1]}/v1/score?explain=2", json.dumps({"message": line}).encode(),
                                 {"Content-Type": "application/json"})
print(urllib.request.urlopen(request).read().decode())
PY
echo "== serving: send more with '.venv/bin/logscore client --socket $socket FILE' or POST http://$http/v1/score; Ctrl-C stops" >&2
wait $server
