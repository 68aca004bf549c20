#!/usr/bin/env bash
# Install what logscore needs on Debian 12 (idempotent): system packages, then a
# virtualenv in .venv with logscore and its test/train extras.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# A fresh Debian 12 server has no python3: python3-venv brings it, python3-dev its headers.
if command -v python3 >/dev/null; then
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=(python3-dev)
else
  missing+=(python3-venv python3-dev)
fi
command -v openssl >/dev/null || missing+=(openssl)
# Times written without a zone are read in --time-zone: named zones come from Debian's zone data.
dpkg -s tzdata >/dev/null 2>&1 || missing+=(tzdata)
# The compiled featurizer (sidecar/logscore/features/_native.c) is built at install: gcc and Python's
# headers (python3-dev, above). Without them logscore still installs and runs its pure-Python featurizer.
command -v gcc >/dev/null || missing+=(gcc)
if [ "${LOGSCORE_WITH_RUBY:-1}" = 1 ]; then
  # The Fluentd plugin's tests run on Debian's Ruby packages.
  for package in ruby ruby-grpc ruby-google-protobuf ruby-msgpack ruby-test-unit ruby-treetop \
                 protobuf-compiler protobuf-compiler-grpc; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
fi
if [ "${LOGSCORE_WITH_BROWSER_AND_DB:-1}" = 1 ]; then
  # The review page's test drives Debian's Chromium; the fleet's feedback store is tested on a
  # throwaway PostgreSQL cluster (tests/postgres_cluster.py).
  for package in chromium chromium-driver postgresql; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
fi
if [ "${LOGSCORE_WITH_SHIPPERS:-0}" = 1 ]; then
  # Real Fluentd (from source) runs on these Debian gems; the Fluent Bit binary needs these libraries.
  for package in ruby-cool.io ruby-yajl ruby-http-parser.rb ruby-sigdump ruby-tzinfo ruby-strptime \
                 ruby-console ruby-async ruby-async-http ruby-webrick libyaml-0-2 libssl3 libsqlite3-0; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
fi
# Installing packages needs root: run as root, or as a user with sudo (Debian installs sudo only
# when the installer was given no root password).
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
  echo "[setup] missing Debian packages, and installing them needs root (sudo is not installed): ${missing[*]}" >&2
  echo "[setup] as root, run: apt-get install -y ${missing[*]}   then run this script again" >&2
  exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  # On a machine just booted, unattended-upgrades may be installing upgrades: wait for dpkg's lock.
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
    "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
# pip runs only when what it installs from changed (the code itself is an editable install).
stamp=.venv/.logscore-installed
inputs=$(cat pyproject.toml setup.py $(find sidecar -name '*.c' -o -name '*.h' | sort) | sha256sum)
if [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ] && .venv/bin/python -c 'import logscore' 2>/dev/null; then
  echo "[setup] up to date: .venv/bin/logscore"
  exit 0
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -c 'from logscore.features import native; print("[setup] featurizer:", native.status())'
echo "$inputs" > "$stamp"
echo "[setup] ready: .venv/bin/logscore"
