#!/usr/bin/env bash
# The GPU check (about 5 minutes): the step suite on CUDA, then the tests that need a GPU.
# Run from the repository root on a machine with a CUDA device and the package installed
# (pip install torch==<the README's pin, a CUDA build> && pip install -e ".[test]").
# Writes its results under ${OUT:-gpu-check}/.
set -euo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 300 refadamw bench --suite step --device cuda --out "$out" | tee "$out/step.log"
# every test parametrized over `device` runs its cuda case; the CUDA-only tests run too
timeout 900 python -m pytest -q -x -k "cuda" tests/ | tee "$out/tests.log"
