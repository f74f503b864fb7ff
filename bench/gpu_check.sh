#!/usr/bin/env bash
# gpu_check.sh: the whole GPU round in ONE call on a lent GPU machine (torch, Triton, nvcc and
# compute-sanitizer preinstalled, no registry), in priority order, each step under its own time
# limit inside a total budget; every step logs to its own file and the round goes on whatever a
# step returns. After EVERY step the results so far are packed into $OUT (the folder that comes
# back), so a call killed at its limit still returns everything finished before.
#
#   step            limit  what
#   env               30s  nvidia-smi, kernel (Firecracker / gVisor), nvcc, compute-sanitizer, versions
#   build            180s  the extension, built in place by ninja in build/gpu_check (incremental on a
#                          warm machine; MAX_JOBS = all cores, TORCH_CUDA_ARCH_LIST = this GPU's);
#                          every step imports the package from this tree (PYTHONPATH); fails if the
#                          cuda backend is absent. GPU_CHECK_BUILD=pip: pip install --no-build-isolation
#                          --no-deps -e . instead (never incremental: setuptools compiles in a new temp dir)
#   tests_cuda       100s  pytest -m gpu -k "not triton"   (every gpu-marked test outside the Triton ones)
#   tests_triton     100s  pytest -m gpu -k triton
#   memcheck_pair     60s  compute-sanitizer memcheck: bench/sanitize_small.py --engine pair  (cuda)
#   memcheck_class    60s  compute-sanitizer memcheck: bench/sanitize_small.py --engine class (cuda)
#   bench            120s  bench/run.py bf16 D=512 N=1024..16384: matmul cuda triton reference pml
#   bigmem            75s  bench/run.py bf16 D=512 N=65536: matmul cuda triton reference (memory point)
#   bench_compile    150s  bench/run.py bf16 D=512 N=1024..16384: matmul compile (torch.compile(reference))
#   tests_triton_dev  60s  pytest -m "not gpu" -k triton: the interpreter-tested Triton suite, on the GPU
#   racecheck         60s  compute-sanitizer racecheck: sanitize_small.py --engine all (cuda)
#   memcheck_triton   90s  compute-sanitizer memcheck: sanitize_small.py --engine all --backends triton
#   memcheck_full     90s  compute-sanitizer memcheck: csrc/cuda/sanitize_case.py (if present)
# plus warm_compile, in the background from the start until bench begins: the same torch.compile
# sweep, untimed, on the cores the build and the tests leave idle, so that bench_compile finds
# inductor's on-disk caches warm (compile time is never part of a timing either way).
# A step gets min(its limit, budget left - 15 s for packing); with under 10 s left it is SKIPPED.
#
# Usage
#   device tool:  run(command="bash bench/gpu_check.sh", timeout_s=540[, carry=[".whl"]]); give_back()
#   here (CPU):   bash bench/gpu_check.sh --dry-run   # every step on the CPU, tiny sizes, Triton
#                 interpreter, no sanitizer (its script runs on the CPU kernels instead); exit 0 only
#                 if every step ran and returned 0. tests/test_gpu_check_dry_run.py runs it.
# Back in $OUT (at most 7 files): summary.txt (each step: status, rc, time, limit, counts),
# logs.tgz (logs/<step>.log, the pytest junit XMLs), results.tgz (bench/results/<gpu-tag>/...:
# `tar -xzf results.tgz` in the repo root puts them in place), and as plain files the main sweep's
# CSV and time plot, the compile sweep's CSV and the N=65536 CSV.
# Exit code: 0 if every step returned 0, else 1 (2: bad arguments).
#
# Knobs (environment)
#   GPU_CHECK_BUDGET  seconds for the whole round (default 450; dry run 400)
#   GPU_CHECK_STEPS   comma list of the steps to run (default: all, in the order above)
#   GPU_CHECK_LIMIT_<step>  that step's limit in seconds (e.g. GPU_CHECK_LIMIT_bench=200)
#   GPU_CHECK_BUILD   inplace (default) or pip
#   GPU_CHECK_WORKERS pytest-xdist workers for the test steps, if xdist is installed (default 8)
#   BENCH_N           sweep N (default "1024 2048 4096 8192 16384"); BENCH_BIG_N (default 65536)
#   BENCH_ARGS        extra bench/run.py arguments for the three bench steps (e.g. "--loss ms circle")
#   PYTEST_ARGS       extra pytest arguments for the test steps
#   PYTHON            interpreter (default python3; dry run: .venv/bin/python if there)
#   OUT               where the packed results go (the device tool sets it; default: <scratch>/out)
#   KEEP_WORK=1       keep the scratch folder (/tmp/gpu_check.*) of a dry run (a real run keeps it)
# Packages missing there (pytorch-metric-learning: the `pml` provider) can travel as wheels in
# .whl/ (carry=[".whl"]): they are installed with --no-index into /tmp/site first.
set -u

usage() { sed -n '2,/^set -u$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

DRY=0
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$a' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
if [[ -z "${PYTHON:-}" && $DRY == 1 && -x .venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; fi
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/logs
RES_PARENT=$WORK/res          # holds bench/results/<tag>/ (the repo layout, for results.tgz)
mkdir -p "$LOGS"
OUT=${OUT:-$WORK/out}          # the device tool sets OUT; elsewhere the scratch folder
mkdir -p "$OUT"
SUMMARY=$WORK/summary.txt
if [[ $DRY == 1 ]]; then BUDGET=${GPU_CHECK_BUDGET:-400}; else BUDGET=${GPU_CHECK_BUDGET:-450}; fi
PACK_RESERVE=15
MIN_STEP=10
START=$(date +%s)
ALL_STEPS=env,build,tests_cuda,tests_triton,memcheck_pair,memcheck_class,bench,bigmem,bench_compile,tests_triton_dev,racecheck,memcheck_triton,memcheck_full
STEPS=",${GPU_CHECK_STEPS:-$ALL_STEPS},"
WORKERS=${GPU_CHECK_WORKERS:-8}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}   # every step imports fused_pairloss from this tree
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1                 # Triton on CPU tensors: its interpreter
  export CUDA_VISIBLE_DEVICES=""            # never touch a GPU in a dry run, even where one is
  # `make test` installs the wheel and builds nothing in the tree: the tree's Python code (same
  # commit) then loads the installed wheel's library
  if ! compgen -G "$ROOT/fused_pairloss/_C*.so" > /dev/null && [[ -z ${FUSED_PAIRLOSS_LIBRARY:-} ]]; then
    INSTALLED_LIB=$(cd / && env -u PYTHONPATH "$PY" -P -c \
      'import glob, os, fused_pairloss as f; print(next(iter(glob.glob(os.path.join(os.path.dirname(f.__file__), "_C*.so"))), ""))' \
      2>/dev/null || true)
    [[ -n $INSTALLED_LIB ]] && export FUSED_PAIRLOSS_LIBRARY=$INSTALLED_LIB
  fi
fi

FAILED=()
CHILD=
WARM_PID=
WARM_T0=

elapsed() { echo $(( $(date +%s) - START )); }
want() { [[ $STEPS == *",$1,"* ]]; }
say() { echo "[gpu_check $(printf '%3d' "$(elapsed)")s] $*"; }
record() { echo "$*" >> "$SUMMARY"; echo "$*"; }

{
  echo "gpu_check $([[ $DRY == 1 ]] && echo DRY-RUN) $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo '+dirty') host $(hostname) budget ${BUDGET}s"
  printf '%-17s %-8s %-6s %6s %6s  %s\n' step status rc time limit notes
} > "$SUMMARY"

# ---- packing: everything so far into $OUT (called after every step) ----------------------
PLAIN_FILES=()
pack() {
  cp -f "$SUMMARY" "$OUT/summary.txt"
  tar -czf "$WORK/logs.tgz" -C "$WORK" logs 2>/dev/null
  if [[ -f $WORK/logs.tgz ]] && (( $(stat -c %s "$WORK/logs.tgz") > 15 * 1024 * 1024 )); then
    # keep each log's last 2 MiB so the file stays under the 16 MiB limit
    rm -rf "$WORK/logs_cut"; mkdir -p "$WORK/logs_cut/logs"
    for f in "$LOGS"/*; do tail -c 2097152 "$f" > "$WORK/logs_cut/logs/$(basename "$f")"; done
    tar -czf "$WORK/logs.tgz" -C "$WORK/logs_cut" logs 2>/dev/null
  fi
  cp -f "$WORK/logs.tgz" "$OUT/logs.tgz"
  if [[ -d $RES_PARENT/bench ]]; then
    tar -czf "$WORK/results.tgz" -C "$RES_PARENT" bench 2>/dev/null && cp -f "$WORK/results.tgz" "$OUT/results.tgz"
    for f in "${PLAIN_FILES[@]}"; do
      [[ -f $RESDIR/$f ]] && cp -f "$RESDIR/$f" "$OUT/$f"
    done
  fi
  return 0
}

# ---- notes for the summary, read off a step's log -------------------------------------------
notes_of() {
  local log=$1 n=""
  # pytest tally ("3 passed, 2 skipped, 100 deselected in 4.2s"), collect-only ("12 tests collected")
  n+=$(grep -aE '[0-9]+ (passed|failed|skipped|deselected|errors?|tests? collected).* in [0-9.]+s' "$log" | tail -1 | sed -E 's/=+//g; s/^ +| +$//g')
  # bench/run.py status counts and loss mismatches
  n+=$(grep -aE '^\[bench\] [A-Z_]+: [0-9]+' "$log" | tail -1 | sed 's/^\[bench\]/ bench/')
  local w; w=$(grep -ac '^\[bench\] WARNING' "$log")
  (( w > 0 )) && n+=" ($w loss mismatches vs reference)"
  # compute-sanitizer and sanitize_small.py
  n+=$(grep -aE '(ERROR|RACECHECK) SUMMARY:' "$log" | tail -1 | sed -E 's/^=+ */ /')
  n+=$(grep -aE '^sanitize_(small|case): .*(runs OK|OK on)' "$log" | tail -1 | sed -E 's/^sanitize_[a-z]+:/ /; s/ in [0-9.]+ s on .*//')
  grep -aq '^build_info:' "$log" && n+=" $(grep -a '^build_info:' "$log" | tail -1 | grep -oE "'cuda': (True|False)")"
  n+=$(grep -aE '^(GPU|kernel): |compiles$' "$log" | tr '\n' ' ' | sed 's/^/ /')
  echo "$n" | sed -E 's/^ +//' | cut -c1-160
}

# ---- one step ---------------------------------------------------------------------------------
# step NAME LIMIT CMD... : CMD under min(LIMIT, budget left - PACK_RESERVE) seconds.
# DRYNOTE (set before the call): what a dry run does instead of the real thing ("" = the real thing).
DRYNOTE=""
step() {
  local name=$1 max=$2
  shift 2
  if ! want "$name"; then DRYNOTE=""; return 0; fi
  local ov=GPU_CHECK_LIMIT_$name
  max=${!ov:-$max}
  local left=$(( BUDGET - $(elapsed) - PACK_RESERVE ))
  local lim=$(( left < max ? left : max ))
  if (( lim < MIN_STEP )); then
    record "$(printf '%-17s %-8s %-6s %6s %6s  %s' "$name" SKIPPED - - "$max" "budget: $(elapsed)s of ${BUDGET}s used")"
    FAILED+=("$name"); pack; DRYNOTE=""; return 0
  fi
  local log=$LOGS/$name.log t0 rc dt status
  printf '=== [%s] limit %ss, started at %ss of the round%s\n$ %s\n' "$name" "$lim" "$(elapsed)" \
    "${DRYNOTE:+ (dry run: $DRYNOTE)}" "${*@Q}" > "$log"
  say "$name: start (limit ${lim}s)"
  t0=$(date +%s)
  # in the background + wait: a TERM to this script is handled at once (trap below)
  timeout --signal=TERM --kill-after=15 "$lim" "$@" >> "$log" 2>&1 < /dev/null &
  CHILD=$!
  wait "$CHILD"; rc=$?
  CHILD=
  dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    if [[ $DRY == 1 && -n $DRYNOTE ]]; then status=dry; else status=OK; fi
  elif (( rc == 124 || rc == 137 )); then status=TIMEOUT
  else status=FAIL
  fi
  (( rc != 0 )) && FAILED+=("$name")
  echo "=== [$name] $status rc=$rc after ${dt}s" >> "$log"
  record "$(printf '%-17s %-8s %-6s %5ss %5ss  %s' "$name" "$status" "$rc" "$dt" "$lim" "$(notes_of "$log")")"
  if [[ $status != OK && $status != dry ]]; then tail -n 15 "$log" | sed 's/^/    | /'; fi
  DRYNOTE=""
  pack
  return 0
}

# ---- the background compile warm-up --------------------------------------------------------
warm_start() {  # warm_start LIMIT CMD...
  local lim=$1; shift
  printf '=== [warm_compile] background, limit %ss, started at %ss\n$ %s\n' "$lim" "$(elapsed)" "${*@Q}" > "$LOGS/warm_compile.log"
  WARM_T0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$lim" "$@" >> "$LOGS/warm_compile.log" 2>&1 < /dev/null &
  WARM_PID=$!
  say "warm_compile: started in the background (pid $WARM_PID)"
}
warm_stop() {
  [[ -n $WARM_PID ]] || return 0
  local how=finished
  if kill -0 "$WARM_PID" 2>/dev/null; then how="stopped (bench starts)"; kill -TERM "$WARM_PID" 2>/dev/null; fi
  wait "$WARM_PID"; local rc=$?
  local dt=$(( $(date +%s) - WARM_T0 ))
  [[ $how == finished ]] || rc=0      # stopping it on purpose is no failure
  echo "=== [warm_compile] $how rc=$rc after ${dt}s" >> "$LOGS/warm_compile.log"
  record "$(printf '%-17s %-8s %-6s %5ss %6s  %s' "warm_compile" "bg" "$rc" "$dt" "-" "$how; $(notes_of "$LOGS/warm_compile.log")")"
  WARM_PID=
}

on_signal() {
  trap - TERM INT
  say "interrupted: stopping the running step and packing what there is"
  [[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null && wait "$CHILD" 2>/dev/null
  [[ -n $WARM_PID ]] && kill -TERM "$WARM_PID" 2>/dev/null
  record "interrupted at $(elapsed)s"
  pack
  [[ $DRY == 1 && ${KEEP_WORK:-0} != 1 && $OUT != "$WORK"/* ]] && rm -rf "$WORK"
  exit 1
}
trap on_signal TERM INT

say "$([[ $DRY == 1 ]] && echo 'DRY RUN: ')budget ${BUDGET}s, work $WORK, out $OUT, python $PY"

# ---- optional carried wheels (pytorch-metric-learning for the pml provider) --------------------
if [[ $DRY == 0 ]] && compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl > "$LOGS/wheels.log" 2>&1
  wrc=$?
  record "$(printf '%-17s %-8s %-6s' wheels "$( ((wrc == 0)) && echo OK || echo FAIL)" "$wrc") $(ls .whl | tr '\n' ' ')"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# ---- settings of the two modes ------------------------------------------------------------------
SAN=""
if [[ $DRY == 1 ]]; then
  DEVTAG=cpu-dryrun
  DTYPE=bfloat16; D=32
  SWEEP_N="64"; BIG_N="128"
  FUSED="cpu triton"
  # one worker per (loss, provider), as on the GPU (the CPU default is a fresh process per point)
  BENCH_DEV=(--device cpu --repeats 1 --warmup 1 --max-seconds 2 --isolate group)
  BIG_LOSS=(--loss ms softtriple) # one pair and one class loss: the sweep above has them all
  # the dry run checks the steps' plumbing: one pair and one class loss in the sweep and in the
  # interpreted Triton walk (the suite runs every loss through the interpreter)
  SWEEP_LOSS=(--loss ms softtriple)
  SAN_TRITON_LOSS=(--loss multi_similarity_loss soft_triple_loss)
  COMPILE_LOSS=(--loss ms)       # one compile is the check; five would take minutes on 2 cores
  SAN_DEV=(--device cpu --dims 37)
  WARM_THREADS=1
else
  # "<capability> <name>", e.g. "9.0 NVIDIA H200" (bounded: a broken GPU must not hang the round)
  gpu=$(timeout 60 $PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0))' 2>/dev/null)
  cap=${gpu%% *}
  DEVTAG=$(echo "${gpu#* }" | sed -E 's/[^A-Za-z0-9]+/-/g; s/^-+|-+$//g')   # = bench/run.py's device tag
  DEVTAG=cuda-${DEVTAG:-unknown}
  DTYPE=bfloat16; D=512
  SWEEP_N=${BENCH_N:-1024 2048 4096 8192 16384}; BIG_N=${BENCH_BIG_N:-65536}
  FUSED="cuda triton"
  BENCH_DEV=(--device cuda)
  COMPILE_LOSS=()
  BIG_LOSS=()
  SWEEP_LOSS=()
  SAN_TRITON_LOSS=()
  SAN_DEV=(--device cuda)
  WARM_THREADS=8
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then    # build for this GPU only: faster
    [[ $cap =~ ^[0-9]+\.[0-9]+$ ]] && export TORCH_CUDA_ARCH_LIST=$cap
  fi
fi
RESDIR=$RES_PARENT/bench/results/$DEVTAG
TAG_MAIN=${DTYPE}_D${D}
TAG_BIG=${DTYPE}_D${D}_N${BIG_N}
TAG_COMPILE=${DTYPE}_D${D}_compile
PLAIN_FILES=("${TAG_MAIN}_results.csv" "${TAG_MAIN}_time.png" "${TAG_COMPILE}_results.csv" "${TAG_BIG}_results.csv")
echo "device tag $DEVTAG; TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS; sweep N=$SWEEP_N, big N=$BIG_N, $DTYPE D=$D" >> "$SUMMARY"
# shellcheck disable=SC2206
BENCH_EXTRA=(${BENCH_ARGS:-})
# shellcheck disable=SC2206
PYTEST_EXTRA=(${PYTEST_ARGS:-})
BENCH=("$PY" bench/run.py "${BENCH_DEV[@]}" --dtype "$DTYPE" --d "$D" --out "$RESDIR" --strict)
# a dry run draws the plots of the main sweep only (the plots of the other two are the same code)
NOPLOT=(); [[ $DRY == 1 ]] && NOPLOT=(--no-plots)
# shellcheck disable=SC2206
COMPILE_CMD=("${BENCH[@]}" --n $SWEEP_N --provider matmul compile "${COMPILE_LOSS[@]}" --timeout 120 --tag "$TAG_COMPILE" "${NOPLOT[@]}" "${BENCH_EXTRA[@]}")

# pytest: parallel workers where pytest-xdist is installed (the GPU image has it; a crashed worker
# takes only its own tests with it), a per-test limit where pytest-timeout is
PYTEST=("$PY" -m pytest tests -q -rfEs -p no:cacheprovider --continue-on-collection-errors --durations=10)
if [[ $DRY == 0 ]] && $PY -c 'import xdist' 2>/dev/null && (( WORKERS > 1 )); then PYTEST+=(-n "$WORKERS"); fi
# (thread method: a test stuck in a kernel is ended too; under xdist only its worker goes)
if $PY -c 'import pytest_timeout' 2>/dev/null; then
  PYTEST+=(--timeout 60)
  [[ " ${PYTEST[*]} " == *" -n "* ]] && PYTEST+=(--timeout-method thread)
fi

# ==== 1. env ======================================================================================
cat > "$WORK/env_probe.py" <<'PYEOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU:", p.name, "sm_%d%d" % (p.major, p.minor), p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30), "GiB")
for mod in ("triton", "pytorch_metric_learning", "xdist", "pytest_timeout", "matplotlib", "tqdm"):
    try:
        print(mod, getattr(importlib.import_module(mod), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(mod, "MISSING", type(e).__name__, "(pytorch_metric_learning: pml points are SKIP)"
              if mod == "pytorch_metric_learning" else "")
sys.exit(0 if torch.cuda.is_available() or sys.argv[1:] == ["dry"] else 3)
PYEOF
[[ $DRY == 1 ]] && DRYNOTE="no GPU: versions only"
step env 30 bash -c "uname -a; echo \"kernel: \$(uname -r)\"; nproc; free -g | head -2; df -h /tmp . | tail -2; \
  if command -v nvidia-smi >/dev/null; then nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,power.limit --format=csv; else echo 'no nvidia-smi'; fi; \
  command -v nvcc >/dev/null && nvcc --version | tail -2; \
  [[ -n '$SAN' ]] && '$SAN' --version | head -2; \
  $PY $WORK/env_probe.py $([[ $DRY == 1 ]] && echo dry)"

# the compile warm-up starts now, on the cores the build leaves idle (bench_compile reads its caches)
if want bench_compile; then
  # (it never loads fused_pairloss._C: the build may be writing that file meanwhile; the compiled
  # reference is pure PyTorch, and its inductor cache entries are the same either way)
  warm_start 400 env TORCHINDUCTOR_COMPILE_THREADS=$WARM_THREADS FUSED_PAIRLOSS_LIBRARY=/nonexistent/_C.so \
    "${COMPILE_CMD[@]/--strict/--no-plots}" \
    --repeats 1 --warmup 1 --max-seconds 1 --out "$WORK/warm"
fi

# ==== 2. build ====================================================================================
# `pip install -e .` is never incremental: setuptools' editable build compiles in a fresh temporary
# folder every time. So the extension is built in place by ninja in build/gpu_check (kept between
# calls on a warm machine: a rerun recompiles only what changed), and every step imports the package
# from this tree (PYTHONPATH above). GPU_CHECK_BUILD=pip (or no setup.py) takes the pip route.
if [[ -f setup.py && ${GPU_CHECK_BUILD:-inplace} != pip ]]; then
  BUILD_CMD="$PY setup.py build_ext --inplace --build-temp build/gpu_check"
else
  BUILD_CMD="$PY -m pip install --no-build-isolation --no-deps --no-index -v -e ."
fi
if [[ $DRY == 1 ]]; then
  # the suite's install built the extension already: compile nothing, but check both build command
  # lines (setup.py configures its extension and knows build_ext's options; pip prepares the
  # editable metadata) and what the package loads
  DRYNOTE="no compile: setup.py and pip checked"
  step build 90 bash -c "echo 'would run: $BUILD_CMD'; \
    $PY setup.py build_ext --help | grep -E -- '--inplace|--build-temp' && \
    $PY -m pip install --no-build-isolation --no-deps --no-index --dry-run -e . && \
    $PY -c 'import fused_pairloss as f; i = f.build_info(); print(\"build_info:\", i); print(\"backends cpu:\", f.available_backends(\"cpu\")); assert i[\"cpu\"], i'"
else
  step build 180 bash -c "$BUILD_CMD && \
    $PY -c 'import fused_pairloss as f; i = f.build_info(); print(\"build_info:\", i); print(\"backends cuda:\", f.available_backends(\"cuda\")); assert i[\"cuda\"], i'"
fi

# ==== 3. GPU tests (selected by the gpu marker; split by keyword so each engine gets its time) =====
[[ $DRY == 1 ]] && DRYNOTE="no GPU: collected, all skipped by conftest"
step tests_cuda 100 "${PYTEST[@]}" -m gpu -k "not triton" --junitxml "$LOGS/tests_cuda.xml" "${PYTEST_EXTRA[@]}"
[[ $DRY == 1 ]] && DRYNOTE="no GPU: collected, all skipped by conftest"
step tests_triton 100 "${PYTEST[@]}" -m gpu -k triton --junitxml "$LOGS/tests_triton.xml" "${PYTEST_EXTRA[@]}"

# ==== 4. compute-sanitizer memcheck, one small case per engine (the CUDA C++ kernels) ==============
san_step() {  # san_step NAME LIMIT TOOL SCRIPT ARGS...
  local name=$1 lim=$2 tool=$3; shift 3
  if [[ $DRY == 1 ]]; then
    # no sanitizer on the CPU: log its command line, check the script parses its arguments, and
    # run the same calls on the CPU (backend cuda -> cpu; triton -> its interpreter)
    DRYNOTE="no sanitizer: $1 on the CPU"
    if [[ $1 == *.py && $(basename "$1") == sanitize_small.py ]]; then
      local args=("${@/#cuda/cpu}" "${SAN_DEV[@]}")
      step "$name" "$lim" bash -c "echo 'would run: PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 50 $PY $* --device cuda'; \
        $PY $1 --help > /dev/null && $PY ${args[*]}"
    else
      step "$name" 60 bash -c "echo 'would run: PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 50 $PY $*'; \
        $PY -m py_compile $1 && echo '$1 compiles'"
    fi
    return 0
  fi
  if [[ -z $SAN ]]; then
    if want "$name"; then
      record "$(printf '%-17s %-8s %-6s %6s %6s  %s' "$name" SKIPPED - - "$lim" 'no compute-sanitizer found')"
      FAILED+=("$name")
    fi
    return 0
  fi
  # no caching allocator: an out-of-bounds access into a cached neighbour block is caught too
  local extra=(); [[ $(basename "$1") == sanitize_small.py ]] && extra=("${SAN_DEV[@]}")
  step "$name" "$lim" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 9 \
    --print-limit 50 "$PY" "$@" "${extra[@]}"
}
san_step memcheck_pair 60 memcheck bench/sanitize_small.py --engine pair --backends cuda
san_step memcheck_class 60 memcheck bench/sanitize_small.py --engine class --backends cuda

# ==== 5. the bf16 D=512 sweep: fused backends, reference, PML, matmul (compile: bench_compile) =====
want bench && warm_stop
# shellcheck disable=SC2086
step bench 120 "${BENCH[@]}" --n $SWEEP_N --provider matmul $FUSED reference pml --timeout 60 \
  --tag "$TAG_MAIN" "${SWEEP_LOSS[@]}" "${BENCH_EXTRA[@]}"

# ==== 6. the memory point: N = 65536 ===============================================================
want bigmem && warm_stop
# shellcheck disable=SC2086
step bigmem 75 "${BENCH[@]}" --n $BIG_N --provider matmul $FUSED reference --repeats 3 --warmup 1 \
  --timeout 60 --tag "$TAG_BIG" "${BIG_LOSS[@]}" "${NOPLOT[@]}" "${BENCH_EXTRA[@]}"

# ==== 7. the torch.compile sweep (the warm-up has filled inductor's caches meanwhile) ==============
warm_stop
step bench_compile 150 "${COMPILE_CMD[@]}"

# ==== 8. the rest, while the budget lasts ===========================================================
[[ $DRY == 1 ]] && DRYNOTE="collect only (the suite runs these in the interpreter)"
if [[ $DRY == 1 ]]; then
  step tests_triton_dev 60 "${PYTEST[@]}" -m "not gpu" -k triton --collect-only "${PYTEST_EXTRA[@]}"
else
  step tests_triton_dev 60 "${PYTEST[@]}" -m "not gpu" -k triton --junitxml "$LOGS/tests_triton_dev.xml" "${PYTEST_EXTRA[@]}"
fi
san_step racecheck 60 racecheck bench/sanitize_small.py --engine all --backends cuda --dtypes bfloat16 float32 --dims 40
san_step memcheck_triton 90 memcheck bench/sanitize_small.py --engine all --backends triton --dtypes bfloat16 --dims 40 \
  "${SAN_TRITON_LOSS[@]}"
if [[ -f csrc/cuda/sanitize_case.py ]]; then
  san_step memcheck_full 90 memcheck csrc/cuda/sanitize_case.py
elif want memcheck_full; then
  record "$(printf '%-17s %-8s %-6s %6s %6s  %s' memcheck_full SKIPPED - - - 'no csrc/cuda/sanitize_case.py')"
fi

# ==== done ==========================================================================================
record "total $(elapsed)s; $(( ${#FAILED[@]} )) step(s) not OK${FAILED[*]:+: ${FAILED[*]}}"
pack
ls -la "$OUT"
echo "----- summary.txt"
cat "$OUT/summary.txt"
[[ $DRY == 1 && ${KEEP_WORK:-0} != 1 && $OUT != "$WORK"/* ]] && rm -rf "$WORK"
(( ${#FAILED[@]} == 0 ))
