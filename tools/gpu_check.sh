#!/usr/bin/env bash
# One device call: every GPU test of the package (xdist), then the before/after timing
# of the move (if .device/old is there). Logs to $OUT. Expects tilelang on PYTHONPATH.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; date -u
  python3 -c "import torch, tilelang, transformers; print('torch', torch.__version__, 'tilelang', tilelang.__version__, 'transformers', transformers.__version__)" 2>/dev/null | tail -1; } | tee "$OUT/gpu.txt"
files=$(ls test.py tests/test_*.py | grep -v -E "test_course.py|test_distributed.py|test_package.py|test_train.py")
timeout "${TEST_TIMEOUT:-420}" python3 -m pytest $files -m gpu -n 14 -p no:cacheprovider -q -rf 2>&1 | grep -v INFO | tee "$OUT/gpu_tests.log" | tail -30
