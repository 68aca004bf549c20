#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run every test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
