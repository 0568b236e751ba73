#!/usr/bin/env bash
# The prepared GPU check (experiments/benchmarks/gpu_check.py): throughput, correctness, a short training
# under torchrun, and gpu_check.json/.md in OUT. Runs with the GPU machine's own python3 and the
# wheels scripts/gpu_wheels.sh put in .whl/ (pydantic: nothing else the check needs is missing
# there; FFCV and dvclive are optional, DVC is not used).
#
#   scripts/gpu_check.sh OUT               # on the GPU machine, about 6 minutes
#   scripts/gpu_check.sh OUT --cpu-smoke   # the same script on the CPU, tiny (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [--cpu-smoke]}
shift
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: pydantic is missing and .whl/ has no wheels: run scripts/gpu_wheels.sh here first" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/metapool-site .whl/*.whl
  export PYTHONPATH=/tmp/metapool-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PYTHON" -m experiments.benchmarks.gpu_check --out "$out" "$@"
