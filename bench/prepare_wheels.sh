#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh: the packages the GPU machine's image lacks (it has torch,
# transformers, accelerate and peft, but no trl, datasets, bitsandbytes or deepspeed, and it
# cannot reach any registry). Run here, once, from the repository root; they land in .whl/
# (ignored by git through .git/info/exclude), which the device call carries.
#
#   bash bench/prepare_wheels.sh            # -> .whl/*.whl (about 50 MB; the call's limit is 64 MiB)
#   WHEEL_DIR=/tmp/whl bash bench/prepare_wheels.sh
#
# The GPU image runs Python 3.12 on x86-64 (manylinux): wheels are fetched for that platform,
# whatever this machine is. Versions are the ones the CPU bench was run with (keep one version of
# each: two of one package stop the whole install there).
# DeepSpeed ships only as an sdist, so its wheel is built here:
#   pip wheel --no-deps --no-build-isolation deepspeed==VERSION
# --no-build-isolation builds against the torch already in .venv instead of letting pip fetch a
# CUDA torch (several GB) into an isolated build environment; with no DS_BUILD_* variables set no op
# is compiled, so the wheel is pure Python (its ops are JIT-compiled on first use, not needed here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${WHEEL_DIR:-.whl}
mkdir -p "$DEST"
if [ "$DEST" = ".whl" ] && [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo '/.whl/' >> .git/info/exclude
fi

TRL=${TRL_VERSION:-1.16.0}
DATASETS=${DATASETS_VERSION:-5.2.0}
BNB=${BNB_VERSION:-0.50.2}
DEEPSPEED=${DEEPSPEED_VERSION:-0.19.8}

PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 \
         manylinux_2_35_x86_64; do
  PLATFORMS="$PLATFORMS --platform $p"
done
# trl, datasets (+ dill, multiprocess), bitsandbytes; DeepSpeed's pure-Python needs the image
# lacks (hjson, pydantic and its parts). Everything else they need is in the image (KINDS.md).
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $PLATFORMS -d "$DEST" \
  "trl==$TRL" "datasets==$DATASETS" dill==0.4.1 multiprocess==0.70.19 "bitsandbytes==$BNB" \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5

if ! ls "$DEST"/deepspeed-"$DEEPSPEED"-*.whl >/dev/null 2>&1; then
  "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" "deepspeed==$DEEPSPEED"
fi
ls -la "$DEST"
du -ch "$DEST"/*.whl | tail -1
