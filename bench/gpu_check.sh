#!/usr/bin/env bash
# One whole GPU round in one call on a lent GPU machine (torch + Triton preinstalled, no registry):
#   1. env      nvidia-smi, python / torch / triton versions
#   2. install  pip install --no-build-isolation --no-deps -e .   (builds fused_pairloss._C with CUDA)
#   3. tests    pytest -m gpu (the GPU tests, parametrized over every dtype)
#   4. sanitize compute-sanitizer memcheck + racecheck on csrc/cuda/sanitize_case.py (if present)
#   5. bench    bench/run.py --device cuda --dtype bfloat16 --d 512, N = 1024 .. 16384
#   6. bigmem   the fused backends (+ matmul, reference) at N = 65536: the memory point
#   7. pack     logs and results into "$OUT" (the folder that comes back), results also stay in
#               bench/results/<device-tag>/
# Every step logs to its own file, has a time limit, and the round goes on whatever it returns;
# $OUT/summary.txt lists each step's exit code and time. The whole round keeps within
# GPU_CHECK_BUDGET seconds (default 570, for a 600 s call).
#
# Usage (device tool):  run(command="bash bench/gpu_check.sh", timeout_s=600[, carry=[".whl"]])
# Knobs (environment):
#   GPU_CHECK_STEPS   comma list of steps (default env,install,tests,sanitize,bench,bigmem); to
#                     split a round over two calls while the machine is warm, e.g.
#                     GPU_CHECK_STEPS=env,install,tests,sanitize  then  GPU_CHECK_STEPS=install,bench,bigmem
#                     (the second install is an incremental ninja build: seconds)
#   GPU_CHECK_BUDGET  seconds for the whole round (default 570)
#   BENCH_N           N sweep (default "1024 2048 4096 8192 16384"); BENCH_BIG_N (default 65536)
#   BENCH_ARGS        extra bench/run.py arguments (e.g. "--loss ms circle")
#   PYTEST_ARGS       extra pytest arguments
#   PYTHON            interpreter (default python3)
# Packages missing there (pytorch-metric-learning for the "pml" provider and the PML tests) can
# travel as wheels in .whl/ (carry=[".whl"]): they are installed with --no-index into /tmp/site.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
LOGS=$(mktemp -d /tmp/gpu_check.XXXXXX)
SUMMARY=$LOGS/summary.txt
BUDGET=${GPU_CHECK_BUDGET:-570}
START=$(date +%s)
STEPS=",${GPU_CHECK_STEPS:-env,install,tests,sanitize,bench,bigmem},"
PY=${PYTHON:-python3}
BENCH_N=${BENCH_N:-1024 2048 4096 8192 16384}
BENCH_BIG_N=${BENCH_BIG_N:-65536}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

echo "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" > "$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME MAX_SECONDS RESERVE_SECONDS CMD... : run CMD with a limit of
# min(MAX, budget left - RESERVE), log to $LOGS/NAME.log, record rc and time in the summary.
step() {
  local name=$1 max=$2 reserve=$3
  shift 3
  if [[ $STEPS != *",$name,"* ]]; then return 0; fi
  local left=$(( BUDGET - $(elapsed) - reserve ))
  local lim=$(( left < max ? left : max ))
  if (( lim < 5 )); then
    echo "$(printf '%-9s' "$name") SKIPPED (budget: $(elapsed)s of ${BUDGET}s used)" | tee -a "$SUMMARY"
    return 0
  fi
  local t0=$(date +%s)
  echo "=== [$name] (limit ${lim}s) $*" | tee "$LOGS/$name.log"
  timeout --signal=TERM --kill-after=20 "$lim" "$@" >> "$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local what="rc=$rc"
  (( rc == 124 || rc == 137 )) && what="TIMEOUT after ${dt}s (rc=$rc)"
  echo "$(printf '%-9s' "$name") $what ${dt}s" | tee -a "$SUMMARY"
  tail -n 25 "$LOGS/$name.log"
  return 0
}

# --- optional carried wheels ---------------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl > "$LOGS/wheels.log" 2>&1
  echo "wheels    rc=$? ($(ls .whl | tr '\n' ' '))" | tee -a "$SUMMARY"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# --- 1. environment ------------------------------------------------------------------------
step env 60 0 bash -c "nvidia-smi; command -v nvcc && nvcc --version | tail -2; \
  $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; \
  $PY -c 'import triton; print(\"triton\", triton.__version__)'; \
  $PY -c 'import pytorch_metric_learning as p; print(\"pml\", p.__version__)' || echo 'no pytorch-metric-learning: the pml provider is skipped'"

# Build only for this GPU (faster than the default arch list), unless told otherwise.
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  cap=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)
  [[ -n "$cap" ]] && export TORCH_CUDA_ARCH_LIST=$cap
fi
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS" >> "$SUMMARY"

# --- 2. install ----------------------------------------------------------------------------
step install 300 120 bash -c "$PY -m pip install --no-build-isolation --no-deps -v -e . && \
  $PY -c 'import fused_pairloss as f; print(\"build_info:\", f.build_info()); print(\"cuda backends:\", f.available_backends(\"cuda\"))'"

# --- 3. GPU tests (every dtype is a parametrization of the gpu-marked tests) ----------------
step tests 200 90 $PY -m pytest -m gpu -q -rs --continue-on-collection-errors ${PYTEST_ARGS:-} tests

# --- 4. compute-sanitizer -------------------------------------------------------------------
if [[ -f csrc/cuda/sanitize_case.py ]]; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
  if [[ -n "$SAN" ]]; then
    # no caching allocator: out-of-bounds accesses into cached neighbours are caught too
    step sanitize 120 80 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 bash -c \
      "$SAN --tool memcheck --error-exitcode 9 --print-limit 50 $PY csrc/cuda/sanitize_case.py; m=\$?; echo memcheck rc=\$m; \
       $SAN --tool racecheck --error-exitcode 9 --print-limit 50 $PY csrc/cuda/sanitize_case.py; r=\$?; echo racecheck rc=\$r; \
       exit \$(( m != 0 || r != 0 ))"
  else
    echo "sanitize  SKIPPED (no compute-sanitizer)" | tee -a "$SUMMARY"
  fi
else
  echo "sanitize  SKIPPED (no csrc/cuda/sanitize_case.py)" | tee -a "$SUMMARY"
fi

# --- 5. benchmark sweep (bench/run.py writes partial results when stopped by the limit) ------
# shellcheck disable=SC2086
step bench 420 45 $PY bench/run.py --device cuda --dtype bfloat16 --d 512 --n $BENCH_N \
  --timeout 120 ${BENCH_ARGS:-}

# --- 6. the memory point: fused backends at N = 65536 ---------------------------------------
# shellcheck disable=SC2086
step bigmem 150 15 $PY bench/run.py --device cuda --dtype bfloat16 --d 512 --n $BENCH_BIG_N \
  --provider cuda triton matmul reference --repeats 3 --warmup 1 --timeout 120 \
  --tag bfloat16_D512_N$BENCH_BIG_N ${BENCH_ARGS:-}

# --- 7. pack --------------------------------------------------------------------------------
echo "total $(elapsed)s" >> "$SUMMARY"
cp "$SUMMARY" "$OUT/summary.txt"
tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
# results with their repo paths: `tar -xzf bench_results.tgz` in the repo root puts them in place
RES_DIRS=$(ls -d bench/results/cuda-* 2>/dev/null)
if [[ -n "$RES_DIRS" ]]; then
  # shellcheck disable=SC2086
  tar -czf "$OUT/bench_results.tgz" $RES_DIRS
  # the main sweep also as plain files, to read without unpacking
  main_dir=$(ls -td bench/results/cuda-* | head -1)
  for f in bfloat16_D512_results.csv bfloat16_D512_time.png bfloat16_D512_memory.png \
           "bfloat16_D512_N${BENCH_BIG_N}_results.csv"; do
    [[ -f "$main_dir/$f" ]] && cp "$main_dir/$f" "$OUT/"
  done
fi
ls -la "$OUT"
cat "$OUT/summary.txt"
exit 0
