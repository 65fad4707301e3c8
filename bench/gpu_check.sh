#!/usr/bin/env bash
# bench/gpu_check.sh [OUT_DIR]: everything a one-GPU machine without network can
# check, in under 9 minutes: build dpfast._C with CUDA (all cores), print what
# was built, run the tests, the benchmark and the engine micro-benchmark in a
# short configuration, and the cost model on their results. Logs and JSON go to
# OUT_DIR (default bench/results/). PYTHON chooses the interpreter (default:
# python on PATH); nothing is installed.
#
# Without a GPU it says so, skips the CUDA build and the test suite (CI runs
# that), runs the CPU benchmarks and exits 0.
#
# Exit status: 0 when every step that ran passed, 1 otherwise.
#
# GPU_CHECK_ONLY (step names, space-separated) runs only those steps;
# GPU_CHECK_CPU_TESTS (pytest paths or node ids) narrows the last step's CPU suite.
set -uo pipefail

OUT_ARG=${1:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT_ARG:-$REPO/bench/results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # relative to the caller's folder, before the cd below
cd "$REPO" || exit 1
# python, else python3 (a GPU image may have only python3)
PYTHON=${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-500}  # leaves room for start-up under the 10 minutes of one call
STAMP=$(date +%Y%m%d-%H%M%S)
LOG="$OUT/$STAMP-gpucheck"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
STARTED=$SECONDS
SUMMARY=()

say() { echo "gpu_check: $*" | tee -a "$LOG.log"; }

# step NAME CAP_S COMMAND...: runs COMMAND under a timeout of CAP_S or what is
# left of the budget, whichever is less, output to the terminal and $LOG-NAME.log.
# GPU_CHECK_ONLY="build t-cuda ..." runs only the steps named (a rerun of what failed).
step() {
  local name=$1 cap=$2
  shift 2
  if [[ -n ${GPU_CHECK_ONLY:-} && " $GPU_CHECK_ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$((BUDGET_S - (SECONDS - STARTED)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    SUMMARY+=("$(printf '%-8s skipped: the budget is spent' "$name")")
    say "$name: skipped, ${left}s of the budget left"
    return 1
  fi
  say "$name (at most ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG-$name.log"
  local rc=${PIPESTATUS[0]}
  local status="ok"
  if ((rc == 124 || rc == 137)); then status="TIMED OUT after ${limit}s"; elif ((rc != 0)); then status="FAILED (exit $rc)"; fi
  SUMMARY+=("$(printf '%-8s %-22s %4ss  %s' "$name" "$status" $((SECONDS - t0)) "$LOG-$name.log")")
  return "$rc"
}

newest() { ls -t "$OUT"/*-"$1".json 2>/dev/null | head -n 1; }

finish() {
  say "summary ($((SECONDS - STARTED))s in all; logs and JSON in $OUT):"
  printf '  %s\n' "${SUMMARY[@]}" | tee -a "$LOG.log"
  for line in "${SUMMARY[@]}"; do
    if [[ $line == *FAILED* || $line == *"TIMED OUT"* ]]; then exit 1; fi
  done
  exit 0
}

say "repository $REPO, python $(command -v "$PYTHON" || echo "$PYTHON: not found"), $(nproc) cores, output $OUT"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  say "FAILED: '$PYTHON' cannot import torch; set PYTHON to an interpreter that has it"
  exit 1
fi
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
GPUS=${GPUS:-0}
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$LOG.log"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$LOG.log"
for module in pytest numpy matplotlib tqdm pynvml ninja; do
  "$PYTHON" -c "import $module" 2>/dev/null || say "note: python module '$module' is missing (nothing is installed here)"
done

if [[ $GPUS == 0 ]]; then
  say "NO GPU: torch.cuda.is_available() is False here. Skipping the CUDA build and the test suite;"
  say "running the CPU checks only (CPU replicas). Run this script on a GPU machine for the GPU checks."
  if ls dpfast/_C*.so >/dev/null 2>&1; then
    say "build: skipped, dpfast._C is already built ($(ls dpfast/_C*.so))"
  else
    step build 300 env MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace || finish
  fi
  step info 30 "$PYTHON" -m dpfast.info
  step bench 90 "$PYTHON" -m bench --quick --no-progress --out "$OUT" --label gpucheck-cpu
  step comm 45 "$PYTHON" -m bench.comm --quick --no-progress --out "$OUT" --label gpucheck-cpu-comm
  BENCH_JSON=$(newest gpucheck-cpu); COMM_JSON=$(newest gpucheck-cpu-comm)
  [[ -n $BENCH_JSON && -n $COMM_JSON ]] && \
    step model 45 "$PYTHON" -m bench.model --bench-json "$BENCH_JSON" --comm-json "$COMM_JSON" --out "$OUT" \
      --label gpucheck-cpu-model
  SUMMARY+=("tests    skipped: no GPU here (the CPU tests run in CI: make test)")
  finish
fi

say "$GPUS GPU(s) visible"
# The build's compiler (NOTE [One libstdc++] in setup.py: a wrapper that links libstdc++ statically
# is refused there).
say "compiler: CXX=${CXX:-c++} ($("${CXX:-c++}" --version 2>&1 | head -n 1))"
# A fresh build for this machine's torch; TORCH_CUDA_ARCH_LIST defaults to the visible card.
"$PYTHON" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null ||
  say "note: ninja is missing: torch compiles the extension one file at a time (slower)"
step build 300 env MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace || finish
step info 30 "$PYTHON" -m dpfast.info || finish
if ! "$PYTHON" -c "import sys; from dpfast import _C; sys.exit(0 if _C.cuda_built() else 1)"; then
  say "FAILED: dpfast._C was built without CUDA (see $LOG-build.log)"
  SUMMARY+=("build    FAILED: CPU-only dpfast._C on a GPU machine")
  finish
fi
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  # The tests that exercise CUDA (they need only torch and pytest, which this machine has), and the
  # C++ gradient hooks against this machine's torch; the CPU suite, with hypothesis, torchvision
  # and transformers, is CI's job.
  # A hang in the CUDA path must not eat the budget: one test at most 60 s, with its stacks printed.
  TIMEOUT_ARGS=()
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout 60)
  # One process per file: a crash in one leaves the others' results.
  for file in cuda engine grad_ready reducer; do
    step "t-$file" $([[ $file == cuda || $file == engine ]] && echo 100 || echo 60) "$PYTHON" -X faulthandler -m pytest "tests/test_$file.py" -q -rfE --tb=short -p no:cacheprovider \
      ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"}
  done
  # dpfast against the module on the same chunks one after the other (its arithmetic without its
  # streams) and on the whole batch, TF32 on and off, with and without a synchronize per phase.
  step numerics 60 "$PYTHON" tools/gpu_numerics.py --workloads mlp,cnn,transformer --size small --steps 2
else
  SUMMARY+=("tests    FAILED: pytest is not installed for $PYTHON")
fi
# Issue #4's measurement first: 4 replicas of models with several 25 MB buckets, and the share of
# the reduction hidden under backward; the collectives against a large copy; the cost model on both.
step bench-base 80 "$PYTHON" -m bench --devices 0,0,0,0 --workloads transformer,cnn --size base --steps 10 \
  --warmup 3 --no-progress --out "$OUT" --label gpucheck-base
# 1 MiB to 1 GiB in steps of 4: the tree against a copy and torch's own add of the same size, on 4
# lanes and on 2 (one add step alone).
step comm 60 "$PYTHON" -m bench.comm --quick --no-progress --min-bytes $((1024 * 1024)) \
  --max-bytes $((1024 * 1024 * 1024)) --factor 4 --copy-bytes $((1024 * 1024 * 1024)) --out "$OUT" --label gpucheck-comm
step comm2 40 "$PYTHON" -m bench.comm --devices 0,0 --ops reduce_add,broadcast --quick --no-progress \
  --min-bytes $((1024 * 1024)) --max-bytes $((1024 * 1024 * 1024)) --factor 4 --copy-bytes $((1024 * 1024 * 1024)) \
  --out "$OUT" --label gpucheck-comm2
# bench-base again at about the sizes issue #4 names: a 12-layer transformer (BERT-base's encoder) and a
# CNN of ResNet-50's 100 MB; one process each, so that a failed check of one keeps the other's record.
for workload in transformer cnn; do
  step "large-$workload" 70 "$PYTHON" -m bench --devices 0,0,0,0 --workloads "$workload" --size large --steps 10 \
    --warmup 3 --no-progress --out "$OUT" --label "gpucheck-large-$workload"
done
BENCH_JSON=$(newest gpucheck-base); COMM_JSON=$(newest gpucheck-comm)
if [[ -n $BENCH_JSON && -n $COMM_JSON ]]; then
  step model 30 "$PYTHON" -m bench.model --bench-json "$BENCH_JSON" --comm-json "$COMM_JSON" --out "$OUT" \
    --label gpucheck-model
fi
# Every workload at the small size: correctness against the bare module, and the phases.
step bench 60 "$PYTHON" -m bench --quick --no-progress --out "$OUT" --label gpucheck
# Last, with what is left: the CPU suite against this machine's torch (CI runs it against the
# newest), on all cores where pytest-xdist is there.
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  XDIST_ARGS=()
  "$PYTHON" -c "import xdist" 2>/dev/null && XDIST_ARGS=(-n "$(( $(nproc) / 2 ))")
  read -r -a CPU_TESTS <<< "${GPU_CHECK_CPU_TESTS:-tests}"  # words, never globs (node ids hold [...])
  # The GPU stays visible: a test written for a machine without one can fail beside one (as
  # nn.DataParallel's module moving to cuda:0 did on the H200); the CUDA cases run again too.
  step t-cpu 240 env OMP_NUM_THREADS=1 "$PYTHON" -m pytest "${CPU_TESTS[@]}" -q -rfE --tb=short \
    -p no:cacheprovider --ignore=tests/test_cuda.py ${XDIST_ARGS[@]+"${XDIST_ARGS[@]}"} ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"}
fi
finish
