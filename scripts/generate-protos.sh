#!/usr/bin/env bash
# Regenerate the committed gRPC stubs from proto/ (tests check they are current).
# Usage: scripts/generate-protos.sh [OUTPUT_DIR]   (default sidecar/logscore/generated)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-sidecar/logscore/generated}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out/logscore/v1"
"$python" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  logscore/v1/scorer.proto
# NOTE: protoc writes absolute imports ("from logscore.v1 import ..."); ours live in a package.
sed -i 's/^from logscore\.v1 import scorer_pb2/from . import scorer_pb2/' "$out/logscore/v1/scorer_pb2_grpc.py"
touch "$out/__init__.py" "$out/logscore/__init__.py" "$out/logscore/v1/__init__.py"

# Ruby stubs for the Fluentd plugin, with Debian's protoc and grpc_ruby_plugin (the
# versions of ruby-google-protobuf and ruby-grpc they run on). Skipped without them.
ruby_out=${RUBY_OUT:-fluentd-plugin/lib}
if command -v protoc >/dev/null && command -v grpc_ruby_plugin >/dev/null; then
  mkdir -p "$ruby_out"
  protoc -Iproto --ruby_out="$ruby_out" --grpc_out="$ruby_out" \
    --plugin=protoc-gen-grpc="$(command -v grpc_ruby_plugin)" logscore/v1/scorer.proto
else
  echo "[generate-protos] protoc or grpc_ruby_plugin missing: Ruby stubs not regenerated" >&2
fi
