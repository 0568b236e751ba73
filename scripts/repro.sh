#!/usr/bin/env bash
# `make repro`: the machine's reference rate (experiments.benchmarks.reference: plain
# MobileNetV2 training, a few seconds), then `dvc repro`, then its wall time beside that rate:
# machines differ about 3x in speed, so a time means little without the rate it ran at.
set -uo pipefail
cd "$(dirname "$0")/.."
rate=$(python -m experiments.benchmarks.reference)
echo "make repro: $rate"
start=$(date +%s)
dvc repro "$@"
rc=$?
elapsed=$(( $(date +%s) - start ))
printf 'make repro: dvc repro took %d min %02d s (exit %d); %s\n' \
  $((elapsed / 60)) $((elapsed % 60)) "$rc" "$rate"
exit "$rc"
