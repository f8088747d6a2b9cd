#!/usr/bin/env bash
# One-shot check on a lent GPU machine (bench/README.md): the tier-3 GPU tests, then the
# benchmark matrix that answers the headline questions, all written under $OUT. Nothing is
# installed into the system python.
#
#   OUT=/some/folder bash bench/gpu_check.sh
#
# Environment:
#   OUT             output folder (the device tool provides it)
#   BENCH_COMMIT    commit of the copied tree, recorded in the results (no .git there)
#   XFORMERS_WHEEL  a carried xformers wheel (default: build/wheels/xformers-*.whl if any)
#   STAGES          stages to run (default: info tests models compile kernels extra)
#   SEED_RESULTS    a results file (in the tree) that this run adds its rows to
#   TOTAL_BUDGET_S  wall-clock budget of the whole script (default 450)
#   PYTHON          interpreter (default python3)
#
# Every stage runs under `timeout`; a stage that fails or runs out of time is reported and
# the next one runs. Each result row is written as soon as it is measured, so a stage cut
# short keeps what it finished. The report and a summary table come last.

set -u

cd "$(dirname "$0")/.." || exit 1
export OUT=${OUT:?set OUT to the output folder}
export PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=${STAGES:-info tests models compile kernels extra}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-450}
REPORT_RESERVE_S=25

mkdir -p "$OUT/logs" "$OUT/results"
STATUS=()

# run_stage NAME BUDGET_S COMMAND...: runs COMMAND under the smaller of its budget and the
# time left before the report's reserve, logs to $OUT/logs/NAME.log, shows the log's tail.
run_stage() {
    local name=$1 budget=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((TOTAL_BUDGET_S - REPORT_RESERVE_S - SECONDS))
    if ((left < 10)); then
        STATUS+=("$name: not run, no time left")
        return 0
    fi
    ((budget > left)) && budget=$left
    local log="$OUT/logs/$name.log" started=$SECONDS rc verdict=ok
    echo "=== $name (budget ${budget}s) ==="
    timeout -k 10 "$budget" "$@" >"$log" 2>&1
    rc=$?
    tail -n 12 "$log"
    if ((rc == 124 || rc == 137)); then
        verdict="STOPPED at its time budget"
    elif ((rc != 0)); then
        verdict="FAILED (exit $rc)"
    fi
    STATUS+=("$name: $verdict after $((SECONDS - started))s of ${budget}s (logs/$name.log)")
}

stage_info() {
    nvidia-smi
    local wheel=${XFORMERS_WHEEL:-$(ls build/wheels/xformers-*.whl 2>/dev/null | head -n 1)}
    if [[ -n "$wheel" ]]; then
        # --target and --no-deps: the wheel lands in a folder of its own and cannot replace
        # the system torch; the import below proves torch is still the same.
        local site="${TMPDIR:-/tmp}/dinov2_fast-xformers" torch_before
        torch_before=$("$PYTHON" -c "import torch; print(torch.__version__)")
        "$PYTHON" -m pip install --no-deps --no-index --quiet --target "$site" "$wheel" &&
            PYTHONPATH="$site:$PYTHONPATH" "$PYTHON" -c "
import torch, xformers.ops
assert torch.__version__ == '$torch_before', 'torch changed to ' + torch.__version__
print('xformers', xformers.__version__, 'on torch', torch.__version__)" &&
            echo "$site" >"$OUT/logs/xformers-site"
    fi
    "$PYTHON" -c "
import os, torch
from bench import harness
assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU machine'
env = harness.environment(torch.device('cuda'))
print('\n'.join(f'{key}: {value}' for key, value in env.items()))
with open(os.path.join(os.environ['OUT'], 'logs', 'results-name'), 'w') as out:
    print(harness.default_results_path(env).name, file=out)"
}

# bench_pytest STAGE SUITE MATRIX [PYTEST ARGS...]
bench_pytest() {
    local stage=$1 suite=$2 matrix=$3
    shift 3
    "$PYTHON" -m pytest "bench/$suite" -q -p no:cacheprovider -rfEs \
        --bench-matrix "$matrix" --bench-results "$RESULTS" \
        --benchmark-json "$OUT/logs/pytest-benchmark-$stage.json" \
        --benchmark-columns median,iqr,rounds,iterations --benchmark-sort name "$@"
}

# Stages run in child shells under `timeout`, which runs programs, not functions.
export -f stage_info bench_pytest

run_stage info 30 bash -c stage_info
# The info stage named the results file after the card and installed a carried xformers.
RESULTS="$OUT/results/$(cat "$OUT/logs/results-name" 2>/dev/null || echo "gpu-$(date -u +%F).json")"
export RESULTS
if [[ -n "${SEED_RESULTS:-}" && ! -f "$RESULTS" ]]; then
    cp "$SEED_RESULTS" "$RESULTS"
fi
if [[ -f "$OUT/logs/xformers-site" ]]; then
    PYTHONPATH="$(cat "$OUT/logs/xformers-site"):$PYTHONPATH"
fi

run_stage tests 100 "$PYTHON" -m pytest -m gpu tests -q -p no:cacheprovider -rfEs \
    --continue-on-collection-errors
# The compile of transformers' model is the slowest step: a stage of its own, so that it
# cannot starve the other headline rows, nor they it.
run_stage models 120 bash -c "bench_pytest models test_model_bench.py check -k 'not hf-compile'"
run_stage compile 100 bash -c "bench_pytest compile test_model_bench.py check -k hf-compile"
run_stage kernels 70 bash -c "bench_pytest kernels test_kernel_bench.py check"
run_stage extra 60 bash -c "bench_pytest extra test_model_bench.py extra"

echo "=== report ==="
if [[ -f "$RESULTS" ]]; then
    timeout -k 5 "$REPORT_RESERVE_S" "$PYTHON" -m bench.report "$RESULTS" --summary \
        >"$OUT/logs/report.log" 2>&1
    STATUS+=("report: exit $? (logs/report.log; Markdown and plots beside the results)")
else
    STATUS+=("report: no results file was written")
fi

echo
echo "=== stages: ${SECONDS}s in all ==="
printf '%s\n' "${STATUS[@]}"
echo
sed -n '/^Measured on/,$p' "$OUT/logs/report.log" 2>/dev/null
