#!/usr/bin/env bash
# Fill .whl/ at the repo root (for scripts/gpu_check.sh) with the wheels the GPU machine lacks (it has Python 3.12,
# torch, tensorboard, tqdm, pyarrow, pandas; it lacks hydra-core, omegaconf, datasets).
# Run from the project's root, then name .whl in the device run's carry and begin the
# command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
# Extra packages (torchao==0.18.0, say): pass NAME==VERSION arguments; they are fetched the same way.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl hydra-core==1.3.8 omegaconf==2.3.1 datasets dill multiprocess "$@"
# antlr4 4.9.3 (required by hydra-core 1.3) ships only as source: build its pure-Python wheel.
ls .whl/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1 || \
  python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
