#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (Python 3.12, x86-64, no network there) into
# .whl/ (git-ignored): pydantic and what it needs. The device tool carries .whl/ along and
# scripts/gpu_check.sh installs them there. Versions are those of this project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
for pkg in pydantic pydantic-core annotated-types typing-extensions typing-inspection; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg==$version"
done
ls -1 .whl
