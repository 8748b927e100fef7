#!/usr/bin/env bash
# Out-of-bounds check: run the ragged-shape GPU tests (TMA and cp.async builds)
# under compute-sanitizer's memcheck. Slow; GPU only.
set -uo pipefail
compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
  python3 -m pytest test.py -q -m gpu -p no:cacheprovider -k "ampere or (matches_reference and (1000 or 65 or 113))" "$@"
