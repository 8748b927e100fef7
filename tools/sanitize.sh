#!/usr/bin/env bash
# Out-of-bounds check: the ragged-shape GPU tests under compute-sanitizer's
# memcheck, in one process (no -n: the sanitizer must see the kernels). GPU only.
set -uo pipefail
compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
  python3 -m pytest test.py -q -m gpu -p no:cacheprovider -k "matches_reference and (1000 or 65 or 113 or 1025)" "$@"
