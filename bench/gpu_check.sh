#!/usr/bin/env bash
# One-shot GPU check of the fused SFTMix loss (issues #11, #26): the `gpu`-marked kernel tests, the kernel benchmark
# at the Llama-3-8B and Gemma-2-2B heads (bf16, N = 8192: rowchunk, rowchunk_nomix, triton, torch, reference, compile,
# liger when installed) and per-phase timings beside the cost model, in under 8 minutes on one H100 or H200.
#
#     bash bench/gpu_check.sh              # on the GPU machine, from anywhere; results under $OUT when it is set
#     bash bench/gpu_check.sh --dry-run    # here, on CPU: the same steps at tiny shapes (plumbing, not figures)
#     bash bench/gpu_check.sh --steps bench,tests   # only these steps (environment, bench, phases, tests, compile)
#
# Needs: bash, coreutils `timeout`, Python 3.10+ with torch and triton (CUDA build), pytest, and a C compiler with
# Python's headers (Triton compiles a small C helper at its first launch on a machine: the preflight shows whether
# that works). Optional: hypothesis (only the CPU property tests use it; without it their module is skipped),
# liger_kernel (its rows), nvidia-smi. Not needed: TRL, datasets, transformers (made unimportable for the tests).
# Nothing is installed (the lent GPU machines reach no network): the package is laid out as it installs
# (sftmix_trl/ with kernels/ as sftmix_trl.kernels) in a temporary folder on PYTHONPATH. The kernel tests run with
# tests/conftest.py left out (it builds the tiny transformers models).
#
# Steps, most valuable first, each under its own timeout cut to what is left of the budget (GPU_CHECK_BUDGET_S,
# default 450 s, so that the whole check with the machine's own start stays under 8 minutes); a step with under 20 s
# left is skipped and says so:
#   1. environment (GPU, driver, python, torch, triton), the package import check, and the preflight
#      (python -m bench.kernel --preflight: a trivial Triton launch, torch's fp32-output GEMM as rowchunk calls it, what
#      impl="auto" picks), before any timing
#   2. kernel benchmark, each head: rowchunk, rowchunk_nomix, triton, torch, reference (+ liger), --check (relative
#      errors); an implementation that fails gets an error row and the others go on
#   3. per-phase timings, each head (python -m bench.kernel --phases): the rowchunk chunk's GEMMs and element-wise pass
#      (block_v 256 and 512) and the triton forward kernel, CUDA events, beside the cost model's phases
#   4. the `gpu`-marked tests in tests/kernels (--dry-run: collection only, there is no GPU)
#   5. kernel benchmark, each head: torch.compile of the reference (compile warm-up inside the step's timeout)
#   6. summary (bench/gpu_check_summary.py): the bars on the measured rows, priced for the device they ran on, beside
#      the cost model
# Files (at most 8, for the device tool): gpu-check.log, summary.txt, kernel.csv, gpu-tests.xml.
# Environment: OUT (results folder; default bench/results/gpu-check), PYTHON (default python3, or .venv/bin/python
# here), GPU_CHECK_BUDGET_S, GPU_CHECK_MACHINE (device name for the CSV; default: torch's), GPU_CHECK_COMMIT (the
# commit, where the copy has no .git).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
STEPS=environment,bench,phases,tests,compile
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --steps) STEPS="${2:?--steps needs a comma-separated list}"; shift ;;
        --steps=*) STEPS="${1#--steps=}" ;;
        -h | --help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for step in ${STEPS//,/ }; do
    case "$step" in
        environment | bench | phases | tests | compile) ;;
        *) echo "gpu_check.sh: unknown step '$step' in --steps (environment, bench, phases, tests, compile)" >&2; exit 2 ;;
    esac
done
wants() { [[ ",$STEPS," == *",$1,"* ]]; }

if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x "$REPO/.venv/bin/python" && $DRY_RUN == 1 ]]; then PYTHON="$REPO/.venv/bin/python"
else PYTHON=python3
fi
RESULTS="${OUT:-$REPO/bench/results/gpu-check}"
mkdir -p "$RESULTS" || { echo "gpu_check.sh: cannot create $RESULTS" >&2; exit 2; }
LOG="$RESULTS/gpu-check.log"
SUMMARY="$RESULTS/summary.txt"
CSV="$RESULTS/kernel.csv"
: >"$LOG"
: >"$SUMMARY"
rm -f "$CSV" "$RESULTS/gpu-tests.xml"
# the step caps and the budget are the GPU machine's; --dry-run checks plumbing under Triton's CPU interpreter, which a
# loaded CPU (a test suite beside it) can slow several times over: there every cap and the budget are 5 times longer
CAP_SCALE=$((DRY_RUN ? 5 : 1))
BUDGET_S="${GPU_CHECK_BUDGET_S:-$((450 * CAP_SCALE))}"
START_S=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

log() { echo "$*" | tee -a "$LOG"; }
note() { echo "$*" | tee -a "$LOG" >>"$SUMMARY"; }

# run_step NAME CAP_S COMMAND...: COMMAND under `timeout` (CAP_S, or what is left of the budget), output to the log
FAILED=0
run_step() {
    local name="$1" cap="$(($2 * CAP_SCALE))"
    shift 2
    local left=$((BUDGET_S - (SECONDS - START_S)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        note "step $name: SKIPPED (${left}s of the ${BUDGET_S}s budget left)"
        FAILED=1
        return 0
    fi
    local shown=() word
    for word in "$@"; do [[ "$word" == *$'\n'* ]] && shown+=("<script>") || shown+=("$word"); done
    log "=== step $name (timeout ${limit}s): ${shown[*]}"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    local took=$((SECONDS - began))
    if ((rc == 0)); then
        note "step $name: ok (${took}s)"
    elif ((rc == 124 || rc == 137)); then
        note "step $name: TIMED OUT after ${took}s (rc $rc)"
        FAILED=1
    else
        note "step $name: FAILED (rc $rc, ${took}s)"
        FAILED=1
    fi
}

# the package as it installs, on PYTHONPATH: no pip, no network, no TRL
SITE="$(mktemp -d)/site"
trap 'rm -rf "$(dirname "$SITE")"' EXIT
mkdir -p "$SITE/sftmix_trl"
cp -r "$REPO/sftmix_trl/." "$SITE/sftmix_trl/"
cp -r "$REPO/kernels" "$SITE/sftmix_trl/kernels"
# the bench package beside it, run as `python -P -m bench.<module>`
mkdir -p "$SITE/bench"
cp "$REPO"/bench/*.py "$SITE/bench/"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# python -P: the working directory is not put on sys.path (the checkout's sftmix_trl/ lacks kernels/)
BLOCK_TRL="import sys; sys.modules.update(trl=None, datasets=None, transformers=None)"
IMPORT_CHECK="$BLOCK_TRL
import os, sftmix_trl.kernels as kernels
assert os.path.realpath(kernels.__file__).startswith(os.path.realpath('$SITE')), kernels.__file__"

if ((DRY_RUN)); then
    export TRITON_INTERPRET=1
    DEVICE_ARGS=(--device cpu --dtype fp32)
    HEAD_ARGS=(smollm2-135m)
    SIZE_ARGS=(--tokens 64 --repeats 1 --warmup 0)
    PHASE_SIZE_ARGS=(--tokens 16 --repeats 1 --warmup 0)
else
    unset TRITON_INTERPRET
    DEVICE_ARGS=(--device cuda --dtype bf16)
    HEAD_ARGS=(llama-3-8b gemma-2-2b)
    SIZE_ARGS=(--tokens 8192 --repeats 10 --warmup 2)
    PHASE_SIZE_ARGS=(--tokens 8192 --repeats 10 --warmup 2)
fi
MACHINE_ARGS=()
[[ -n "${GPU_CHECK_MACHINE:-}" ]] && MACHINE_ARGS=(--machine "$GPU_CHECK_MACHINE")
COMMIT="${GPU_CHECK_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"

ENVIRONMENT_PY="$IMPORT_CHECK
import platform, torch
try:
    import triton; triton_version = triton.__version__
except ImportError:
    triton_version = 'none'
try:
    import liger_kernel; liger = 'present'
except ImportError:
    liger = 'absent'
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print(f'python {platform.python_version()}; torch {torch.__version__}; triton {triton_version}; liger {liger}; {cuda}')
print('sftmix_trl.kernels imports from', kernels.__file__, 'without trl, datasets or transformers')"

# pytest with sftmix_trl.kernels already imported from $SITE, tests/conftest.py left out (--confcutdir)
PYTEST_PY="$IMPORT_CHECK
import pytest
sys.exit(pytest.main(sys.argv[1:]))"
TEST_ARGS=(tests/kernels -m gpu -q --confcutdir=tests/kernels -o pythonpath= -p no:cacheprovider)
TEST_ARGS+=(--junitxml="$RESULTS/gpu-tests.xml")
((DRY_RUN)) && TEST_ARGS+=(--collect-only)

BENCH_ARGS=("${DEVICE_ARGS[@]}" "${SIZE_ARGS[@]}" --modes full --csv "$CSV" "${MACHINE_ARGS[@]}")

log "gpu_check.sh: results in $RESULTS; budget ${BUDGET_S}s"
cd "$REPO" || exit 2
if command -v nvidia-smi >/dev/null 2>&1; then
    run_step nvidia-smi 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv
else
    note "nvidia-smi: not found"
fi
note "commit $COMMIT; dry run $DRY_RUN; python $PYTHON; steps $STEPS"
if wants environment; then
    run_step environment 60 "$PYTHON" -P -c "$ENVIRONMENT_PY"
    run_step preflight 90 "$PYTHON" -P -m bench.kernel --preflight "${DEVICE_ARGS[@]}"
fi
if wants bench; then
    for head in "${HEAD_ARGS[@]}"; do
        run_step "bench-$head" 110 "$PYTHON" -P -m bench.kernel --shapes "$head" "${BENCH_ARGS[@]}" \
            --impls rowchunk rowchunk_nomix triton torch liger reference --check
    done
fi
if wants phases; then
    for head in "${HEAD_ARGS[@]}"; do
        run_step "phases-$head" 60 "$PYTHON" -P -m bench.kernel --phases --shapes "$head" "${DEVICE_ARGS[@]}" \
            "${PHASE_SIZE_ARGS[@]}" --csv "$CSV" "${MACHINE_ARGS[@]}"
    done
fi
wants tests && run_step gpu-tests 100 "$PYTHON" -P -c "$PYTEST_PY" "${TEST_ARGS[@]}"
if wants compile; then
    for head in "${HEAD_ARGS[@]}"; do
        run_step "compile-$head" 100 "$PYTHON" -P -m bench.kernel --shapes "$head" "${BENCH_ARGS[@]}" --impls compile
    done
fi
"$PYTHON" -P -m bench.gpu_check_summary "$CSV" --commit "$COMMIT" 2>&1 | tee -a "$LOG" >>"$SUMMARY"
log "gpu_check.sh: $((SECONDS - START_S))s in all"
echo "----- $SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
