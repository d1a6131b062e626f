#!/usr/bin/env bash
# One call on the GPU machine (device tool): install, GPU tests, kernel report. Results under $OUT.
#   run: bash benchmarks/gpu_check.sh            (carry benchmarks/peers for MONAI + fused-lncc)
# Steps are independent: a failing test run still produces the report. Prints the tables last.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=python3
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }

log "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv; $PY -c \
  "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"

log "install (the C++ extension has no CUDA kernels yet: skipped to save device time)"
DEEPATLAS_FAST_NO_EXTENSION=${DEEPATLAS_FAST_NO_EXTENSION:-1} $PY -m pip install -q -e . --no-build-isolation --no-deps \
  > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }

# Peers, in the background while the tests run: MONAI (wheel) and fused-lncc (JIT-built for this GPU only).
PEERS=/tmp/peers
if ls benchmarks/peers/*.whl >/dev/null 2>&1; then
  log "peers: installing in the background"
  ( $PY -m pip install -q --no-deps --no-index --target "$PEERS" benchmarks/peers/monai-*.whl \
    && tar xzf benchmarks/peers/fused_lncc-*.tar.gz -C /tmp \
    && cp -r /tmp/fused_lncc-*/fused_lncc "$PEERS"/ \
    && TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH="$PEERS" $PY -c "import fused_lncc" ) > "$OUT/peers.txt" 2>&1 &
  PEERS_PID=$!
else
  log "peers: benchmarks/peers not carried (pip download --no-deps fused-lncc==0.1.0 monai==1.6.1 -d benchmarks/peers)"
  PEERS_PID=
fi

log "GPU tests"
HYPOTHESIS_EXAMPLES=${HYPOTHESIS_EXAMPLES:-10} timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -x -p no:cacheprovider \
  tests/test_triton_*.py ${EXTRA_TESTS:-} > "$OUT/tests.txt" 2>&1
echo "tests exit code: $?" >> "$OUT/tests.txt"
tail -n 25 "$OUT/tests.txt"

if [ -n "$PEERS_PID" ]; then log "waiting for peers"; wait "$PEERS_PID"; tail -n 3 "$OUT/peers.txt"; fi

log "kernel report"
PYTHONPATH="$PEERS:${PYTHONPATH:-}" timeout "${REPORT_TIMEOUT:-300}" $PY benchmarks/gpu_report.py --out "$OUT" \
  ${REPORT_ARGS:-} > "$OUT/report.log" 2>&1
echo "report exit code: $?"
tail -n 5 "$OUT/report.log"
log "done"
cat "$OUT/report.md" 2>/dev/null
