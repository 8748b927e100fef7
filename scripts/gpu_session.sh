#!/usr/bin/env bash
# One GPU session in one call: GPU tests, memcheck, `make run`, `make bench`, the
# overhead probe; logs to $OUT. Expects tilelang on PYTHONPATH or installed.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; date -u; } | tee "$OUT/gpu.txt"
python3 -m pytest test.py -q -m gpu -n 8 -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
bash scripts/sanitize.sh 2>&1 | tee "$OUT/sanitize.log" | grep -E "ERROR SUMMARY|passed|failed"
python3 bench.py --assignment 2>&1 | grep -v INFO | tee "$OUT/run.log"
python3 bench.py --out "$OUT" "$@" 2>&1 | grep -v INFO | tee "$OUT/bench.log"
python3 scripts/probe_overhead.py 2>&1 | grep "^|" | tee "$OUT/probe.log"
cp configs/gpus.json "$OUT/" 2>/dev/null || true
