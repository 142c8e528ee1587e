#!/usr/bin/env bash
# Set up a fresh machine: the Debian data packages (when root) and a virtual environment in .venv
# with codistill installed (editable) with its test, translation, peers (torchft), lightning, trackers (mlflow, wandb), storage (fsspec, s3fs) and export (safetensors) extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Data (Fashion-MNIST, the SWORD Bible modules) and iproute2 (ip, tc) for the slow-network benchmark.
DEBIAN_DATA="dataset-fashion-mnist sword-text-kjv sword-text-sparv sword-text-web iproute2"
if command -v dpkg >/dev/null && command -v apt-get >/dev/null; then
    missing=""
    for pkg in $DEBIAN_DATA; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        if [ "$(id -u)" = 0 ]; then
            echo "setup: installing Debian data packages:$missing"
            apt-get update -q
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
        else
            echo "setup: not root; install these Debian packages for the real data:$missing" >&2
        fi
    fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test,translation,peers,lightning,trackers,storage,export]"
.venv/bin/python -c "import codistill, torch; print(f'setup: codistill {codistill.__version__}, torch {torch.__version__}')"
