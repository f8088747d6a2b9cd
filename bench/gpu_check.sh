#!/usr/bin/env bash
# One-shot check on a lent GPU machine (bench/README.md): the tier-3 GPU tests, then the
# benchmark matrix that answers the headline questions. Nothing is installed into the
# system python.
#
#   OUT=/some/folder bash bench/gpu_check.sh
#
# What lands in $OUT (the device tool brings back at most 8 files, 2 folders deep), flat:
#   <gpu-slug>-<date>.json               the results, rewritten after every row
#   <gpu-slug>-<date>.md                 the report (bench/report.py)
#   <gpu-slug>-<date>-{throughput,kernels}.png   its plots, where matplotlib imports
#   <gpu-slug>-<date>-plans.json         the plan question (bench/plan_check.py): per headline
#                                        shape, every plan candidate's time, the plan that won
#                                        and why, whole forwards against transformers' peers
#   <gpu-slug>-<date>-mixed.json         mixed-aspect sets: packed varlen vs padded vs
#                                        per-size batches (bench/mixed_resolution.py)
#   logs.tgz                             logs/ of the scratch folder: one log per stage,
#                                        pytest-benchmark's JSON per suite, stages.txt;
#                                        repacked after every stage
# and, only if the run was killed at that instant, a <stem>.partial or logs.tgz.tmp.
# Everything else (logs, the xformers folder, markers) goes to a scratch folder.
#
# Environment:
#   OUT             output folder (the device tool provides it)
#   BENCH_COMMIT    commit of the copied tree, recorded in the results (no .git there)
#   XFORMERS_WHEEL  a carried xformers wheel (default: build/wheels/xformers-*.whl if any)
#   STAGES          stages to run after `info`, which always runs
#                   (default: plans tests models mixed compile kernels decode)
#   SEED_RESULTS    a results file (in the tree) that this run adds its rows to; used only
#                   when its "gpu" is this card
#   TOTAL_BUDGET_S  wall-clock budget of the whole script, report included (default 420)
#   PYTHON          interpreter (default python3)
#
# Every stage runs under `timeout` (SIGINT first, so pytest still writes its summary and
# --benchmark-json; SIGKILL 10 s later); a stage that fails or runs out of time is reported
# and the next one runs. Each result row is written as soon as it is measured, so a stage
# cut short keeps what it finished. The report and a summary table come last.

set -u

cd "$(dirname "$0")/.." || exit 1
export OUT=${OUT:?set OUT to the output folder}
export PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STAGES=${STAGES:-plans tests models mixed compile kernels decode}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-420}
REPORT_RESERVE_S=25
# Results are rewritten in place after every row; everything else goes to a scratch folder
# that is packed into $OUT/logs.tgz after every stage.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
export WORK LOGS="$WORK/logs"
mkdir -p "$LOGS" "$OUT" || exit 1
STATUS=()

# pack_logs: $WORK/logs -> $OUT/logs.tgz, atomically (a cut-off run leaves the last good one).
pack_logs() {
    printf '%s\n' "${STATUS[@]}" >"$LOGS/stages.txt"
    tar -czf "$OUT/logs.tgz.tmp" -C "$WORK" logs && mv -f "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"
}

# run_stage NAME BUDGET_S COMMAND...: runs COMMAND under the smaller of its budget and the
# time left before the report's reserve, logs to $LOGS/NAME.log, shows the log's tail.
run_stage() {
    local name=$1 budget=$2
    shift 2
    case " info $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((TOTAL_BUDGET_S - REPORT_RESERVE_S - SECONDS))
    if ((left < 10)); then
        STATUS+=("$name: not run, no time left")
        return 0
    fi
    ((budget > left)) && budget=$left
    local log="$LOGS/$name.log" started=$SECONDS rc verdict=ok
    echo "=== $name (budget ${budget}s) ==="
    timeout -s INT -k 10 "$budget" "$@" >"$log" 2>&1
    rc=$?
    tail -n 12 "$log"
    if ((rc == 124 || rc == 137)); then
        verdict="STOPPED at its time budget"
    elif ((rc != 0)); then
        verdict="FAILED (exit $rc)"
    fi
    STATUS+=("$name: $verdict after $((SECONDS - started))s of ${budget}s (logs/$name.log)")
    pack_logs
}

stage_info() {
    nvidia-smi
    local wheel=${XFORMERS_WHEEL:-$(ls build/wheels/xformers-*.whl 2>/dev/null | head -n 1)}
    local site=""
    if [[ -n "$wheel" ]]; then
        # --target and --no-deps: the wheel lands in a folder of its own and cannot replace
        # the system torch (checked below).
        site="$WORK/xformers-site"
        "$PYTHON" -m pip install --no-deps --no-index --quiet --target "$site" "$wheel" ||
            site=""
    fi
    # One interpreter for everything else: the card, versions, the results file's name, and
    # whether the carried xformers imports.
    XFORMERS_SITE="$site" "$PYTHON" - <<'PY' || return
import os
import sys

import torch

from bench import harness

assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
env = harness.environment(torch.device("cuda"))
print("\n".join(f"{key}: {value}" for key, value in env.items()))
logs = os.environ["LOGS"]
with open(os.path.join(logs, "results-name"), "w") as out:
    print(harness.default_results_path(env).name, file=out)
with open(os.path.join(logs, "gpu-name"), "w") as out:
    print(env["gpu"], file=out)
site = os.environ.get("XFORMERS_SITE")
if site:
    shadowed = [name for name in ("torch", "triton") if os.path.exists(os.path.join(site, name))]
    if shadowed:
        sys.exit(f"xformers NOT used: its folder holds {shadowed}, which would replace ours")
    # On the benchmarks' path even if it does not import: their xformers rows then carry
    # the import error instead of "not installed".
    with open(os.path.join(logs, "xformers-site"), "w") as out:
        print(site, file=out)
    sys.path.insert(0, site)
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as error:  # noqa: BLE001 - reported, and the rows will say it too
        print(f"xformers does not import: {type(error).__name__}: {error}")
    else:
        print("xformers", xformers.__version__, "on torch", torch.__version__)
PY
    if [[ -n "$site" ]]; then
        # Which attention operators xformers can use here (its extension was built for
        # another torch: some may be missing).
        PYTHONPATH="$site:$PYTHONPATH" timeout 20 "$PYTHON" -m xformers.info \
            >"$LOGS/xformers-info.log" 2>&1
        echo "python -m xformers.info: exit $? (logs/xformers-info.log)"
    fi
}

# bench_pytest STAGE SUITE MATRIX [PYTEST ARGS...]
bench_pytest() {
    local stage=$1 suite=$2 matrix=$3
    shift 3
    "$PYTHON" -m pytest "bench/$suite" -q -p no:cacheprovider -rfEs \
        --bench-matrix "$matrix" --bench-results "$RESULTS" \
        --benchmark-json "$LOGS/pytest-benchmark-$stage.json" \
        --benchmark-columns median,iqr,rounds,iterations --benchmark-sort name "$@"
}

# Stages run in child shells under `timeout`, which runs programs, not functions.
export -f stage_info bench_pytest

run_stage info 60 bash -c stage_info
# The info stage named the results file after the card and installed a carried xformers.
GPU_NAME=$(cat "$LOGS/gpu-name" 2>/dev/null)
RESULTS="$OUT/$(cat "$LOGS/results-name" 2>/dev/null || echo "gpu-$(date -u +%F).json")"
export RESULTS
if [[ -n "${SEED_RESULTS:-}" ]]; then
    seed_gpu=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("gpu"))' \
        "$SEED_RESULTS" 2>/dev/null)
    if [[ -f "$RESULTS" ]]; then
        STATUS+=("seed: $RESULTS exists already, SEED_RESULTS not used")
    elif [[ -n "$GPU_NAME" && "$seed_gpu" == "$GPU_NAME" ]]; then
        cp "$SEED_RESULTS" "$RESULTS" && STATUS+=("seed: rows of $SEED_RESULTS carried over")
    else
        STATUS+=("seed: WARNING, not used: $SEED_RESULTS is of '${seed_gpu:-unreadable}', \
this card is '${GPU_NAME:-unknown}'")
        echo "${STATUS[-1]}"
    fi
fi
if [[ -f "$LOGS/xformers-site" ]]; then
    PYTHONPATH="$(cat "$LOGS/xformers-site"):$PYTHONPATH"
fi

# First: whether the project has a reason to exist is the plan question (issue 9).
run_stage plans 150 "$PYTHON" -m bench.plan_check --out "${RESULTS%.json}-plans.json"
run_stage tests 70 "$PYTHON" -m pytest -m gpu tests -v --durations=10 -p no:cacheprovider \
    -rfEs --continue-on-collection-errors
# The compile of transformers' model is the slowest step: a stage of its own, so that it
# cannot starve the other headline rows, nor they it.
run_stage models 90 bash -c "bench_pytest models test_model_bench.py check -k 'not hf-compile'"
run_stage mixed 40 "$PYTHON" -m bench.mixed_resolution --out "${RESULTS%.json}-mixed.json"
run_stage compile 60 bash -c "bench_pytest compile test_model_bench.py check -k hf-compile"
run_stage kernels 40 bash -c "bench_pytest kernels test_kernel_bench.py check"
run_stage extra 60 bash -c "bench_pytest extra test_model_bench.py extra"
# Last, in what time is left: --decode exact against gpu (nvjpeg); says why where it cannot run.
run_stage decode 40 "$PYTHON" -m bench.input_pipeline --device cuda --dir "$WORK/bench-inputs"

echo "=== report ==="
if [[ -f "$RESULTS" ]]; then
    # Markdown and plots beside the results, in $OUT.
    timeout -s INT -k 5 "$REPORT_RESERVE_S" "$PYTHON" -m bench.report "$RESULTS" --summary \
        >"$LOGS/report.log" 2>&1
    STATUS+=("report: exit $? (logs/report.log; Markdown and plots beside the results)")
else
    STATUS+=("report: no results file was written")
fi
pack_logs

echo
echo "=== stages: ${SECONDS}s in all ==="
printf '%s\n' "${STATUS[@]}"
files=$(find "$OUT" -type f | wc -l)
echo "\$OUT: $files files (the device tool brings back 8 at most):"
(cd "$OUT" && find . -type f | sort)
((files > 8)) && echo "WARNING: more than 8 files in \$OUT: some will not come back"
echo
sed -n '/^Measured on/,$p' "$LOGS/report.log" 2>/dev/null
rm -rf "$WORK"
