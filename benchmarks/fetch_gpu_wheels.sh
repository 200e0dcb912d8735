#!/usr/bin/env bash
# Run HERE (a machine with network) before a GPU run: puts the wheels the GPU machine lacks into .whl/
# (git-ignored), for the device tool's `carry: [".whl"]`. Its image has torch, numpy, pytest, hypothesis,
# scipy and tqdm, but not MONAI, which the MONAI parity tests and the sliding-window benchmark compare against.
# MONAI is pure Python; its other needs (torch, numpy) are there. ninja: the first-use build of the CUDA kernels
# (torch.utils.cpp_extension.load) needs it, and the image may lack it.
set -euo pipefail
cd "$(dirname "$0")/.."
monai_version=$(python3 -c "import monai; print(monai.__version__)" 2>/dev/null || echo 1.6.1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "monai==${monai_version}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl ninja
ls -l .whl
