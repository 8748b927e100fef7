#!/usr/bin/env bash
# One GPU session in one call: GPU tests, `make run`, `make bench`, logs to $OUT.
# Expects tilelang unpacked on PYTHONPATH (an offline host) or installed.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
python3 -m pytest test.py -q -m gpu -n 8 -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 bench.py --assignment 2>&1 | grep -v INFO | tee "$OUT/run.log"
python3 bench.py --out "$OUT" "$@" 2>&1 | grep -v INFO | tee "$OUT/bench.log"
cp configs/gpus.json "$OUT/" 2>/dev/null || true
