#!/usr/bin/env bash
# One command for a lent accelerator (or, with --dry_run, any machine): every measurement of
# benchmarks/accelerator.py into $OUT (or --out=DIR). Packages missing from the machine's own
# Python travel as wheels in .whl/ (benchmarks/prepare_accelerator.sh makes them) and are
# installed into a temporary folder, never over what is there.
#
#   bash benchmarks/accelerator.sh [--dry_run] [--out=DIR] [--original=PATH] [--budget_s=450]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import grain, ml_collections, tensorboardX" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/linnaeus_jax_site .whl/*.whl
    export PYTHONPATH="/tmp/linnaeus_jax_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "error: $PY lacks grain/ml_collections/tensorboardX and there is no .whl/ folder:" \
         "run benchmarks/prepare_accelerator.sh first" >&2
    exit 1
  fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/accelerator.py "$@"
