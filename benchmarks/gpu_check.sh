#!/usr/bin/env bash
# One call on the GPU machine (device tool): install, GPU tests, kernel report, training-step table.
# Results under $OUT (at most 8 files come back: setup.txt steps.log tests.txt report.{json,md,log}
# train_step.{md,log}).
#   run: bash benchmarks/gpu_check.sh     (carry benchmarks/peers for MONAI + fused-lncc)
# STEPS picks what runs (default "tests report train"); each step has its own time limit and a failing
# step does not stop the next. REPORT_ARGS / TRAIN_ARGS pass options to the two benchmark scripts.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=python3
STEPS=${STEPS:-tests report train}
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

log "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv; $PY -c \
  "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/setup.txt" 2>&1; cat "$OUT/setup.txt"

log "install (the C++ extension has no CUDA kernels yet: skipped to save device time)"
DEEPATLAS_FAST_NO_EXTENSION=${DEEPATLAS_FAST_NO_EXTENSION:-1} $PY -m pip install -q -e . --no-build-isolation --no-deps \
  >> "$OUT/setup.txt" 2>&1 || { cat "$OUT/setup.txt"; exit 1; }

# Peers, in the background while the tests run: MONAI (wheel) and fused-lncc (JIT-built for this GPU only).
PEERS=/tmp/peers
PEERS_PID=
if has report && ls benchmarks/peers/*.whl >/dev/null 2>&1; then
  log "peers: installing in the background"
  ( $PY -m pip install -q --no-deps --no-index --target "$PEERS" benchmarks/peers/monai-*.whl \
    && tar xzf benchmarks/peers/fused_lncc-*.tar.gz -C /tmp \
    && cp -r /tmp/fused_lncc-*/fused_lncc "$PEERS"/ \
    && TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH="$PEERS" $PY -c "import fused_lncc" ) > /tmp/peers.txt 2>&1 &
  PEERS_PID=$!
elif has report; then
  log "peers: benchmarks/peers not carried (pip download --no-deps fused-lncc==0.1.0 monai==1.6.1 -d benchmarks/peers)"
fi

if has tests; then
  log "GPU tests"
  HYPOTHESIS_EXAMPLES=${HYPOTHESIS_EXAMPLES:-10} timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -rf --durations=8 -n ${WORKERS:-8} -k "not cpu" \
    -p no:cacheprovider ${TESTS:-tests/test_triton_gpu.py tests/test_triton_sample.py tests/test_triton_lncc.py \
    tests/test_triton_jacobian.py tests/test_triton_invert.py} > "$OUT/tests.txt" 2>&1
  echo "tests exit code: $?" >> "$OUT/tests.txt"
  tail -n 30 "$OUT/tests.txt"
fi

if has report; then
  if [ -n "$PEERS_PID" ]; then log "waiting for peers"; wait "$PEERS_PID"; tail -n 3 /tmp/peers.txt; cat /tmp/peers.txt >> "$OUT/setup.txt"; fi
  log "kernel report"
  PYTHONPATH="$PEERS:${PYTHONPATH:-}" timeout "${REPORT_TIMEOUT:-240}" $PY benchmarks/gpu_report.py --out "$OUT" \
    ${REPORT_ARGS:-} > "$OUT/report.log" 2>&1
  echo "report exit code: $?"
  tail -n 3 "$OUT/report.log"
fi

if has train; then
  log "training step"
  timeout "${TRAIN_TIMEOUT:-240}" $PY benchmarks/train_step_gpu.py --out "$OUT/train_step.md" ${TRAIN_ARGS:-} \
    > "$OUT/train_step.log" 2>&1
  echo "train step exit code: $?"
fi
log "done"
cat "$OUT/report.md" 2>/dev/null
cat "$OUT/train_step.log" 2>/dev/null
