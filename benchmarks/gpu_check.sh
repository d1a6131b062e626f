#!/usr/bin/env bash
# One call on the GPU machine (device tool): install, GPU tests, kernel report, training-step table.
# Results under $OUT (at most 8 files come back: setup.txt steps.log tests.txt report.{json,md,log}
# train_step.{md,log}).
#   run: bash benchmarks/gpu_check.sh     (carry benchmarks/peers for MONAI + fused-lncc; with the library of
#        benchmarks/prebuild_extension.sh and its stamp, the install skips the build)
# The step limits add up to about 9.8 minutes with a prebuilt extension's install (benchmarks/prebuild_extension.sh;
# building here takes ~50 s more, which the last step, train4, then loses): the device tool allows 10 per call,
# 15 per session: run it with timeout_s=600 and nothing else that session. Measured on
# an H200 on 2026-11-27: install 35 s, GPU tests 55 s, kernel tests 75 + 50 s (the triton ones, all passed
# then, are now cut at 20 s); a fresh machine's report makes about one row per 5 s while Triton compiles, so
# its limit cuts it short (rows are written as made). The opt-in kernels (DEEPATLAS_FAST_CUDA_LNCC / _SPLAT /
# _INVERT_SPLAT / _JACOBIAN=tiled, DEEPATLAS_FAST_CUDA_SPLAT / _INVERT_SPLAT=merged) are tested first; each joins the report,
# the profile, ncu and the tiledloss training step only if its own tests pass.
# STEPS picks what runs, in this order (default: "rawops gputests cudatests report profile ncu ncustall lossmem
# train tiledloss train4"; "upconv" and "trainnhwc" exist too but made no row within their limits on a fresh H200 on
# 2026-11-27, so they left the default to give the tiled tests more time); each step has its own time limit and a
# failing step does not stop the next.
# REPORT_ARGS / TRAIN_ARGS pass options to the two benchmark scripts. After the report, benchmarks/pick_defaults.py
# prints the winner per op and the setting (backend order, variant variable) that would make it the default.
# Issues 3/4 need the full report (160^3 and 256^3, batch 1 and 2, torch.compile, C=16, 2x16x128^3), which does
# not fit beside the tests: a second call, after a first one whose tiled tests passed, e.g.
#   STEPS=report REPORT_TIMEOUT=540 REPORT_ARGS="--points 160x1,160x2,256x1,256x2 --skip-impls reference --reps 10" \
#     bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=python3
STEPS=${STEPS:-rawops gputests cudatests report profile ncu ncustall lossmem train tiledloss train4}
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

log "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv; $PY -c \
  "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/setup.txt" 2>&1; cat "$OUT/setup.txt"

# A library built here by benchmarks/prebuild_extension.sh (carried with its stamp) saves the ~50 s build when
# its stamp matches these sources, this Python and this torch, and it loads; else the install builds it.
PREBUILT=0
if [ -f deepatlas_fast/_C.prebuilt ] && $PY benchmarks/extension_stamp.py --check deepatlas_fast/_C.prebuilt \
    >> "$OUT/setup.txt" 2>&1 && $PY -c "import torch, deepatlas_fast._C" >> "$OUT/setup.txt" 2>&1; then
  PREBUILT=1
fi
if [ "$PREBUILT" = 1 ]; then
  log "install (the prebuilt extension: $(cut -c1-60 deepatlas_fast/_C.prebuilt))"
else
  rm -f deepatlas_fast/_C.prebuilt deepatlas_fast/_C.cpython-*.so
  log "install (builds the C++/CUDA extension: csrc/cuda for sm_90)"
fi
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  DEEPATLAS_FAST_NO_EXTENSION=$([ "$PREBUILT" = 1 ] && echo 1 || echo "${DEEPATLAS_FAST_NO_EXTENSION:-0}") \
  $PY -m pip install -q -e . --no-build-isolation --no-deps >> "$OUT/setup.txt" 2>&1 || { cat "$OUT/setup.txt"; exit 1; }
$PY -c "import deepatlas_fast as da; print('backends on cuda:', da.available_backends('cuda'))" | tee -a "$OUT/setup.txt"

# Peers, in the background while the tests run: MONAI (wheel) and fused-lncc (JIT-built for this GPU only).
PEERS=/tmp/peers
PEERS_PID=
if has report; then
  if ls benchmarks/peers/*.whl >/dev/null 2>&1; then
    log "peers: installing in the background"
    ( $PY -m pip install -q --no-deps --no-index --target "$PEERS" benchmarks/peers/monai-*.whl \
      && tar xzf benchmarks/peers/fused_lncc-*.tar.gz -C /tmp \
      && cp -r /tmp/fused_lncc-*/fused_lncc "$PEERS"/ \
      && TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH="$PEERS" $PY -c "import fused_lncc" ) > /tmp/peers.txt 2>&1 &
    PEERS_PID=$!
  else
    log "peers: benchmarks/peers not carried (pip download --no-deps fused-lncc==0.1.0 monai==1.6.1 -d benchmarks/peers)"
  fi
fi

# pytest gets SIGINT at its limit, so it still prints the failures it has seen ($LAST_TESTS: the last run's output).
LAST_TESTS=/tmp/last_tests.txt
run_tests() {  # name, limit, -k expression, files...
  local name=$1 limit=$2 select=$3; shift 3
  log "tests: $name"
  # one CPU thread per worker: 16 workers with torch's default of 16 threads each oversubscribed the 16 cores 16
  # times over in the float64 CPU references (2026-11-27: the tiled kernels' tests made 44 results in 70 s)
  OMP_NUM_THREADS=${TEST_THREADS:-1} HYPOTHESIS_EXAMPLES=${HYPOTHESIS_EXAMPLES:-5} timeout -s INT -k 15 "$limit" \
    $PY -m pytest -v --tb=short -rfE \
    -n "${WORKERS:-16}" -k "$select" -p no:cacheprovider --durations=10 "$@" 2>&1 \
    | grep -v "PytestBenchmarkWarning\|warner(" | tee "$LAST_TESTS" >> "$OUT/tests.txt"
  local status=${PIPESTATUS[0]}
  echo "tests ($name) exit code: $status" | tee -a "$OUT/tests.txt"
  grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.txt" | tail -n 12
  return "$status"
}

if has rawops; then  # bad inputs to the raw C++ ops on CUDA must raise; controls first, a crash is located
  log "raw C++ ops with bad inputs on cuda"
  timeout "${RAWOPS_TIMEOUT:-45}" $PY benchmarks/raw_op_errors.py --device cuda --controls --locate \
    >> "$OUT/tests.txt" 2>&1
  echo "raw ops exit code: $?" | tee -a "$OUT/tests.txt"
fi

if has gputests; then
  run_tests "GPU (realistic sizes, sync, graphs, compile)" "${GPU_TEST_TIMEOUT:-50}" "not cpu" tests/test_gpu.py
  run_tests "CUDA model tests (bf16 norms, slab-wise upsampled convolution)" "${MODEL_TEST_TIMEOUT:-15}" "cuda" \
    tests/test_model.py tests/test_upsampled_conv.py
fi


# The opt-in CUDA kernels, each selected by a setting VAR=value (deepatlas_fast/ops/_cpp.py), join the report,
# the profile, ncu and the tiledloss step only when their tests pass: a faulting kernel would leave the CUDA
# context unusable for every row after it. A kernel whose test file had a failure (or all, when the run did not
# finish) stays out; the others go on. Their bad-input tests run apart and do not decide: a check throwing from
# CUDA code crashed a worker before (the rawops step), whatever the kernel.
declare -A TILED_VARIABLE=(
  [tests/test_kernels_lncc_tiled.py]=DEEPATLAS_FAST_CUDA_LNCC=tiled
  [tests/test_kernels_splat_tiled.py]=DEEPATLAS_FAST_CUDA_SPLAT=tiled
  [tests/test_kernels_splat_merged.py]=DEEPATLAS_FAST_CUDA_SPLAT=merged
  [tests/test_kernels_invert_splat_tiled.py]=DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled
  [tests/test_kernels_invert_backward_tiled.py]=DEEPATLAS_FAST_CUDA_INVERT_SPLAT=tiled
  [tests/test_kernels_invert_merged.py]=DEEPATLAS_FAST_CUDA_INVERT_SPLAT=merged
  [tests/test_kernels_jacobian_tiled.py]=DEEPATLAS_FAST_CUDA_JACOBIAN=tiled
)
TILED_ALL=$(printf '%s\n' "${TILED_VARIABLE[@]}" | sort -u | tr '\n' ' ')
TILED_FAILED=$TILED_ALL  # until their tests have passed
if has cudatests; then  # the kernel tests on the GPU: the tiled cuda kernels, the cuda backend, then triton
  TILED_TESTS="${!TILED_VARIABLE[*]}"
  run_tests "opt-in tiled cuda kernels" "${TILED_TEST_TIMEOUT:-75}" "not cpu and not rejects_bad_inputs" $TILED_TESTS
  if [ "$?" -le 1 ]; then  # the run finished (0: all passed, 1: some failed)
    TILED_FAILED=$(for f in "${!TILED_VARIABLE[@]}"; do
      grep -qE "^(FAILED|ERROR) $f" "$LAST_TESTS" && echo "${TILED_VARIABLE[$f]}"; done | sort -u | tr '\n' ' ')
  fi
  run_tests "opt-in tiled cuda kernels: bad inputs" 20 "not cpu and rejects_bad_inputs" $TILED_TESTS
  KERNEL_TESTS="tests/test_kernels_sample.py tests/test_kernels_lncc.py tests/test_kernels_jacobian.py tests/test_kernels_invert.py"
  run_tests "kernel tests on cuda: cuda backend" "${CUDA_TEST_TIMEOUT:-65}" "not cpu and not triton" $KERNEL_TESTS
  run_tests "kernel tests on cuda: triton backend" "${TRITON_TEST_TIMEOUT:-20}" "not cpu and triton" $KERNEL_TESTS
fi
log "tiled kernels left out (tests failed or did not run): ${TILED_FAILED:-none}"
# the failing settings, comma-separated: bench.skipped leaves out the variants whose setting contains one
TILED_SKIP=$(for v in $TILED_FAILED; do printf '%s,' "$v"; done)
TILED_SKIP=${TILED_SKIP%,}
REPORT_SKIP=reference${TILED_SKIP:+,$TILED_SKIP}

if has report; then
  if [ -n "$PEERS_PID" ]; then
    log "waiting for peers"; wait "$PEERS_PID"; tail -n 3 /tmp/peers.txt; cat /tmp/peers.txt >> "$OUT/setup.txt"
  fi
  log "kernel report"
  PYTHONPATH="$PEERS:${PYTHONPATH:-}" timeout "${REPORT_TIMEOUT:-50}" $PY benchmarks/gpu_report.py --out "$OUT" \
    ${REPORT_ARGS:---points 256x1,160x1 --skip-impls $REPORT_SKIP --no-compile --reps 10} > "$OUT/report.log" 2>&1
  echo "report exit code: $?"
  tail -n 3 "$OUT/report.log"
  if [ -f "$OUT/report.json" ]; then  # the winners per op and the settings that would make them the defaults
    echo "== defaults the report implies (benchmarks/pick_defaults.py)" >> "$OUT/report.log"
    $PY benchmarks/pick_defaults.py "$OUT/report.json" 2>&1 | tee -a "$OUT/report.log" | tail -n 8
  fi
fi

if has profile; then  # per-kernel times (torch.profiler), appended to report.log
  log "kernel profile"
  echo "== kernel profile" >> "$OUT/report.log"
  timeout "${PROFILE_TIMEOUT:-15}" $PY benchmarks/kernel_profile.py --skip "$TILED_SKIP" ${PROFILE_ARGS:-} >> "$OUT/report.log" 2>&1
  echo "profile exit code: $?"
fi

if has ncu; then  # hardware counters of the cuda backend's kernels at 256³ (Nsight Compute), appended to report.log
  if command -v ncu >/dev/null 2>&1; then
    log "ncu: cuda kernels at 256^3"
    echo "== ncu (csv: kernel, metric, value)" >> "$OUT/report.log"
    timeout "${NCU_TIMEOUT:-30}" ncu --profile-from-start off --clock-control none --csv --print-units base \
      --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__t_sector_hit_rate.pct,launch__registers_per_thread \
      $PY benchmarks/ncu_target.py --backend cuda 2>&1 | grep -v '^==PROF==' | tail -n 400 >> "$OUT/report.log"
    echo "ncu exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/report.log"
  fi
  if command -v ncu >/dev/null 2>&1 && [ "$TILED_FAILED" != "$TILED_ALL" ]; then
    echo "== ncu: the opt-in tiled kernels (lncc, sample volume gradient, Jacobian backward, invert backward)" >> "$OUT/report.log"
    timeout "${NCU_TILED_TIMEOUT:-20}" ncu --profile-from-start off --clock-control none --csv --print-units base \
      --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__t_sector_hit_rate.pct,launch__registers_per_thread,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum \
      $PY benchmarks/ncu_target.py --backend "cuda (tiled),cuda (tiled splat),cuda (merged splat)" --ops lncc,sample,jacobian_var,invert_displacement \
      --skip "$TILED_SKIP" 2>&1 | grep -v '^==PROF==' | tail -n 200 >> "$OUT/report.log"
    echo "ncu (tiled kernels) exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/report.log"
  fi
  command -v ncu >/dev/null 2>&1 || log "ncu: not found"
fi

if has ncustall; then  # why the kernels wait (latency, barriers, throttles): ncu's WarpStateStats section
  if command -v ncu >/dev/null 2>&1; then
    log "ncu: warp stall reasons at 256^3"
    echo "== ncu: warp stall reasons (WarpStateStats), lncc / sample / jacobian_var / invert_displacement" >> "$OUT/report.log"
    timeout "${NCU_STALL_TIMEOUT:-20}" ncu --profile-from-start off --clock-control none --csv --print-units base \
      --section WarpStateStats $PY benchmarks/ncu_target.py --backend "cuda,cuda (tiled),cuda (merged splat)" \
      --ops lncc,sample,jacobian_var,invert_displacement --skip "$TILED_SKIP" 2>&1 | grep -v '^==PROF==' \
      | grep -iE '"ID"|stall|profiled' | cut -c1-400 | tail -n 400 >> "$OUT/report.log"
    echo "ncu (stall reasons) exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/report.log"
  fi
fi

if has upconv; then  # a decoder's upsampled convolution by slabs against resize + conv3d at 256^3 (time, memory)
  log "upsampled convolution: slabs vs resize + conv3d"
  timeout "${UPCONV_TIMEOUT:-10}" $PY benchmarks/upsampled_conv_bench.py >> "$OUT/train_step.log" 2>&1
  echo "upsampled convolution exit code: $?" | tee -a "$OUT/train_step.log"
fi

if has lossmem; then  # the objective's peak by allocation site at 256^3 (the CPU's table: 2026-11-27-loss-memory.md)
  log "loss side's memory by site"
  DEEPATLAS_FAST_BACKEND=${TRAIN_BACKEND:-} timeout "${LOSSMEM_TIMEOUT:-15}" $PY benchmarks/loss_memory.py --side 256 \
    --device cuda >> "$OUT/train_step.log" 2>&1
  echo "loss memory exit code: $?" | tee -a "$OUT/train_step.log"
fi

# The training steps run with cuDNN's benchmark mode, as train does (the tables of 2026-11-26/27 ran without it).
if has train; then  # "fused" = the default backends (DEFAULT_ORDER), or TRAIN_BACKEND for all ops
  log "training step"
  DEEPATLAS_FAST_BACKEND=${TRAIN_BACKEND:-} timeout "${TRAIN_TIMEOUT:-75}" $PY benchmarks/train_step_gpu.py \
    --out "$OUT/train_step.md" ${TRAIN_ARGS:---sizes 256 --repeats 2 --max-side 448 --side-step 64 --max-batch 2 --fit-memory-gib 79} \
    >> "$OUT/train_step.log" 2>&1
  echo "train step exit code: $?"
fi

if has trainnhwc; then  # the U-Net is most of a fused step: channels_last convolutions (contiguous rows: "train")
  log "training step: channels_last convolutions"
  DEEPATLAS_FAST_BACKEND=${TRAIN_BACKEND:-} timeout "${TRAINNHWC_TIMEOUT:-25}" $PY benchmarks/train_step_gpu.py \
    --sizes 256 --ops fused --precision fp32 bf16 --checkpointing off --repeats 2 --no-loss-side --no-find-max \
    --memory-format channels_last >> "$OUT/train_step.log" 2>&1
  echo "train step (channels_last) exit code: $?"
fi

if has tiledloss; then  # every opt-in tiled kernel at once: the step, the loss side and its time by kernel at 256^3
  if [ "$TILED_FAILED" != "$TILED_ALL" ]; then  # (the train step's rows are the defaults)
    # the variants that beat the defaults or are untimed (the tiled sample / invert splats were slower: 2026-11-27)
    TILED_ENV=$(for v in ${TILEDLOSS_SETTINGS:-DEEPATLAS_FAST_CUDA_LNCC=tiled DEEPATLAS_FAST_CUDA_JACOBIAN=tiled \
      DEEPATLAS_FAST_CUDA_SPLAT=merged DEEPATLAS_FAST_CUDA_INVERT_SPLAT=merged}; do [[ " $TILED_FAILED " == *" $v "* ]] || echo "$v"; done)
    log "training step: the tiled kernels that passed their tests:" $TILED_ENV
    env $TILED_ENV \
      timeout "${TILEDLOSS_TIMEOUT:-30}" $PY benchmarks/train_step_gpu.py --sizes 256 --ops fused --precision fp32 \
      --checkpointing off --repeats 2 --no-find-max --time-breakdown >> "$OUT/train_step.log" 2>&1
    echo "train step (tiled kernels) exit code: $?" | tee -a "$OUT/train_step.log"
  else
    log "tiled training step skipped: the tiled kernels' tests did not pass (or did not run)"
  fi
fi

if has train4; then  # issue 5's target: two pairs at 256^3 within 40 GB (bf16 + checkpointing); where memory and loss-side time go
  log "training step: two pairs at 256^3"
  DEEPATLAS_FAST_BACKEND=${TRAIN_BACKEND:-} timeout "${TRAIN4_TIMEOUT:-40}" $PY benchmarks/train_step_gpu.py \
    --sizes 256 --batch 4 --ops fused --precision bf16 --checkpointing on --repeats 2 --no-loss-side --no-find-max --memory-breakdown --time-breakdown \
    >> "$OUT/train_step.log" 2>&1
  echo "train step (batch 4) exit code: $?"
fi
log "done"
cat "$OUT/report.md" 2>/dev/null
cat "$OUT/train_step.log" 2>/dev/null
