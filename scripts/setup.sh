#!/usr/bin/env bash
# Install everything metapool needs, once: Debian packages for FFCV, a virtual environment in
# .venv, the exact locked environment (requirements.lock, every hash checked) and the package
# itself without dependencies. A second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS="pkg-config libopencv-dev libturbojpeg0-dev"
missing=""
for pkg in $DEBS; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages for FFCV:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: FFCV needs Debian packages:$missing. Run: sudo apt-get update && sudo apt-get install -y$missing" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=".venv/.metapool-installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing the locked environment (requirements.lock, hashes checked) and metapool into .venv (first time: a few minutes)"
  .venv/bin/pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
  rm -f .venv/.metapool-installed-*
  touch "$stamp"
fi
