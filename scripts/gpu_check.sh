#!/usr/bin/env bash
# The prepared GPU check (see scripts/gpu_check.py): on a machine without network, install the wheels that
# `make gpu-wheels` built into gpu-wheels/ (only what this python lacks), then run every part within its budget.
#   bash scripts/gpu_check.sh [--out DIR] [--parts env,tests,...]      (results: DIR, else $OUT, else gpu_check_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import chatrlhf, deepspeed, datasets" >/dev/null 2>&1; then
  [ -d gpu-wheels ] || { echo "gpu_check: this python lacks chatrlhf/deepspeed/datasets and gpu-wheels/ is missing: run 'make gpu-wheels' on a machine with network and carry gpu-wheels/ along" >&2; exit 2; }
  # the path must contain "site-packages": dill (datasets' fingerprints) pickles modules found elsewhere by value,
  # and pyarrow's types then fail to pickle; bin/ holds the ninja DeepSpeed compiles its ops with
  target=${GPU_CHECK_SITE:-$PWD/.gpu-site/site-packages}
  echo "gpu_check: installing $(ls gpu-wheels/*.whl | wc -l) wheels into $target (no network, no dependency resolution)..."
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --upgrade --target "$target" gpu-wheels/*.whl
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" PATH="$target/bin:$PATH"
fi
# DeepSpeed compiles its ops on first use: keep them inside the working tree
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
exec "$PY" scripts/gpu_check.py "$@"
