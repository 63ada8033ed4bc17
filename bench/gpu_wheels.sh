#!/usr/bin/env bash
# Build .whl/ (git-ignored): the wheels bench/gpu_suite.py needs on a GPU machine without internet, whose
# image has its own torch and triton (and transformers, pyarrow, pybind11, ninja, ...; see the device's
# package list) but not the peers or DeepSpeed. Run here, with the package registries reachable:
#     bash bench/gpu_wheels.sh [DEST]        # default .whl
# There:  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# CPython 3.12 manylinux wheels (the device's python); versions = requirements.txt's pins.
set -euo pipefail
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# peers (pure-Python wheels), DeepSpeed's runtime needs that the device image lacks, and peft (+ accelerate) for
# the LoRA step variant
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" \
    cut-cross-entropy==25.1.1 liger-kernel==0.8.5 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 editdistance==0.8.1 peft==0.22.0 accelerate==1.15.0
# DeepSpeed ships an sdist only: a wheel of its Python code (its ops build just in time, none needed here)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8 \
    || "$PY" -m pip wheel -q --no-deps -w "$DEST" deepspeed==0.19.8
ls -la "$DEST"
du -sh "$DEST"
