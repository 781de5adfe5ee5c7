#!/usr/bin/env bash
# `make gpu-env-check`: the GPU machine's Python and library versions, on this CPU, before a GPU
# run spends device time. The GPU machine's versions (PINS below; docs/gpu.md) differ from this
# project's venv, so this builds a Python 3.12 venv with them (once, into the ignored
# .gpu/venv312) and runs there, on the CPU:
#   - the GPU proof's dry run, both stages (scripts/gpu_proof.py --dry-run, --stage grid);
#   - the training, export and exercise-grid tests (bentoml's store test aside: no bentoml there).
# Usage: make gpu-env-check  [PY312=/path/to/python3.12]
#        bash scripts/gpu_env_check.sh venv    only build the venv (make gpu-rehearsal uses it)
set -euo pipefail
cd "$(dirname "$0")/.."
# the first Python 3.12 that runs: PY312, python3.12 on the PATH, pyenv's (its shim may be inactive)
PY312=$(for c in ${PY312:-} python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
  "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$c"; break; }
done || true)
VENV=.gpu/venv312
PINS=(torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 onnx==1.23.1 onnxruntime==1.30.0 onnxscript==0.7.2
      pillow tqdm matplotlib httpx prometheus-client pytest pytest-timeout
      nvidia-cuda-cuobjdump==13.5.37)  # the device has CUDA's cuobjdump; the rehearsal's library check uses this one

if [ -z "$PY312" ]; then
  echo "error: no Python 3.12 found; the GPU machine runs Python 3.12 (set PY312=/path/to/python3.12)" >&2
  exit 2
fi
if [ ! -f "$VENV/.installed" ] || [ "$(cat "$VENV/.installed")" != "${PINS[*]}" ]; then
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
  echo "${PINS[*]}" > "$VENV/.installed"
fi
[ "${1:-}" = venv ] && exit 0
"$VENV/bin/python" - <<'EOF'
import platform, numpy, onnx, onnxruntime, torch, torchvision
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"numpy {numpy.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")
EOF
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$VENV/bin/python" scripts/gpu_proof.py --dry-run --out "$out/train"
"$VENV/bin/python" scripts/gpu_proof.py --dry-run --stage grid --out "$out/grid"
# Deselected here: the dry run's end-to-end test (it calls `make gpu-proof`, which takes the project's
# venv; the two lines above are that run), the serve proof's dry run (bentoml, aiohttp, ... travel in
# parts: `make gpu-rehearsal` runs it) and the BentoML store test (no bentoml on the GPU machine).
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_train.py tests/test_export.py \
  tests/test_resources.py tests/test_data.py tests/test_experiments.py tests/test_gpu_proof.py tests/test_gpu.py \
  -k "not import_to_store and not gpu_proof_dry_run and not serve_proof_dry_run"
echo "gpu-env-check: the GPU machine's versions pass on this CPU"
