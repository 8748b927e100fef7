#!/usr/bin/env bash
# A GPU session in a few calls of at most 10 minutes each; logs to $OUT.
# Expects tilelang on PYTHONPATH or installed. Stages:
#   tests   every GPU test but the course kit's (xdist), memcheck of test.py
#   course  the course kit on the GPU (the grader compiles many kernels: minutes)
#   bench   make run, make bench, bench_op.py forward and forward+backward
#   train   train.py (kernel vs SDPA + mask, same seed) and the overhead probe
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; date -u; } | tee "$OUT/gpu.txt"
case "${1:-tests}" in
tests)
  timeout 420 python3 -m pytest test.py tests -m gpu -n 12 -p no:cacheprovider -q --ignore=tests/test_course.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  timeout 120 bash scripts/sanitize.sh 2>&1 | tee "$OUT/sanitize.log" | grep -E "ERROR SUMMARY|passed|failed"
  ;;
course)
  timeout 560 python3 -m pytest tests/test_course.py -n 6 -p no:cacheprovider -q -rA 2>&1 | tee "$OUT/course.log" |
    grep -E "^(PASSED|FAILED|ERROR)|passed|failed"
  ;;
bench)
  python3 bench.py --assignment 2>&1 | grep -v INFO | tee "$OUT/run.log"
  python3 bench.py --out "$OUT" 2>&1 | grep -v INFO | tail -25 | tee "$OUT/bench.log"
  python3 bench_op.py --out "$OUT" 2>&1 | grep "^|" | tee "$OUT/bench_op.log"
  python3 bench_op.py --backward --out "$OUT" 2>&1 | grep "^|" | tee "$OUT/bench_op_bwd.log"
  ;;
train)
  python3 train.py --out "$OUT" 2>&1 | grep -v INFO | tee "$OUT/train.log"
  python3 scripts/probe_overhead.py 2>&1 | grep "^|" | tee "$OUT/probe.log"
  ;;
esac
cp configs/gpus.json "$OUT/" 2>/dev/null || true
