#!/usr/bin/env bash
# Builds deepatlas_fast._C for the GPU machine (Python 3.12, torch 2.11.0+cu130, CUDA for sm_90) here, on a
# machine without a GPU, so that gpu_check.sh skips its ~50 s build (device time is the scarce resource):
#   bash benchmarks/prebuild_extension.sh      # then carry both outputs to the device call, e.g.
#   carry ["benchmarks/peers", "deepatlas_fast/_C.cpython-312-x86_64-linux-gnu.so", "deepatlas_fast/_C.prebuilt"]
# Needs nvcc (CUDA_HOME, default /usr/local/cuda) and a Python 3.12; makes a venv with that torch in
# $PREBUILD_VENV (default /tmp/prebuild-venv312; the CUDA wheel and its libraries: several GB, once).
# Builds a copy of this working tree (tracked and untracked, not ignored files), ~6 minutes on 2 cores.
# Writes deepatlas_fast/_C.prebuilt: the stamp (benchmarks/extension_stamp.py) that gpu_check.sh checks.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
VENV=${PREBUILD_VENV:-/tmp/prebuild-venv312}
if [ -z "${PYTHON312:-}" ]; then  # the first that runs (a pyenv shim may exist without a 3.12 selected)
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1; then
      PYTHON312=$candidate; break
    fi
  done
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -n "${PYTHON312:-}" ] || { echo "prebuild: no python3.12 (set PYTHON312)"; exit 1; }
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "prebuild: no nvcc under CUDA_HOME=$CUDA_HOME"; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON312" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip setuptools wheel ninja
  "$VENV/bin/pip" install -q "$TORCH_SPEC" 'numpy<2.4'
fi
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, 'prebuild: this torch has no CUDA'; print('torch', torch.__version__)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$WORK"
(cd "$WORK" && PATH="$VENV/bin:$PATH" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/python" setup.py -q build_ext --inplace)
LIBRARY=$(cd "$WORK" && ls deepatlas_fast/_C.cpython-312-*.so)
"$VENV/bin/python" -c "import sys; sys.path.insert(0, '$WORK'); import torch, deepatlas_fast._C; \
print(torch.ops.deepatlas_fast_C.build_info())"
cp "$WORK/$LIBRARY" "$ROOT/$LIBRARY"
# the stamp of the copy that was built (the tree may have changed since)
"$VENV/bin/python" "$WORK/benchmarks/extension_stamp.py" > "$ROOT/deepatlas_fast/_C.prebuilt"
echo "prebuilt $ROOT/$LIBRARY ($(du -h "$ROOT/$LIBRARY" | cut -f1)): $(cat "$ROOT/deepatlas_fast/_C.prebuilt")"
