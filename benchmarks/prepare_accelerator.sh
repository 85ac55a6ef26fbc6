#!/usr/bin/env bash
# Prepares what benchmarks/accelerator.sh needs on a machine without network whose Python already
# has JAX (with its GPU plugin), flax, optax, orbax, h5py, pillow and torch: the packages it
# lacks, as wheels in .whl/ (git-ignored), and optionally a checkout of the PyTorch original in
# .orig/linnaeus (git-ignored; never committed) for the side-by-side train step.
#
#   bash benchmarks/prepare_accelerator.sh [ORIGINAL_GIT_URL_OR_PATH]
#
# Wheels are for CPython 3.12 on x86-64 Linux (the GPU image's Python; set PY_VERSION to change).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${PY_VERSION:-3.12}"
# What our install_requires needs beyond such an image, at the versions the tests ran with, and
# their own requirements that the image lacks.
WHEELS=(grain==0.2.18 ml-collections==1.1.0 tensorboardX==2.6.5 array-record==0.8.6
        portpicker==1.6.0 importlib_resources==7.1.0
        starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34  # benchmarks/serve.py
        yacs==0.1.8)  # yacs: the original's config system (the side-by-side run)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
echo "wheels in .whl/: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"
if [ $# -ge 1 ]; then
  rm -rf .orig/linnaeus && mkdir -p .orig
  # A mirror may lack large test files: what the model code needs is checked instead.
  git clone -q "$1" .orig/linnaeus || echo "warning: the checkout is incomplete (see above)"
  test -f .orig/linnaeus/linnaeus/models/mFormerV1.py || {
    echo "error: no linnaeus/models/mFormerV1.py in the checkout of $1" >&2; exit 1; }
  rm -rf .orig/linnaeus/.git .orig/linnaeus/tests/test_data
  echo "original in .orig/linnaeus: $(du -sh .orig/linnaeus | cut -f1)"
fi
echo "carry .whl (and .orig) with the run; then: bash benchmarks/accelerator.sh"
