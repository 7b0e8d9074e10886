#!/usr/bin/env bash
# The GPU suite in one go, under 9 minutes on one H200 (README.md, "GPU suite"):
#
#   1. python -m benchmarks.gpu_check   correctness at N=4096, forward/backward timed apart at N=16,384 / 16,400
#   2. python -m benchmarks.fit_32b     a REAL step of a Qwen3-32B-shaped LoRA judge, fused head then naive
#   3. python -m benchmarks --preset gpu-32b
#   4. python -m benchmarks --preset gpu-8b
#
# Every step runs under `timeout`: its share of the total (GPU_SUITE_SECONDS, 525 by default) is its own cap
# plus whatever the steps before it left unused, less the caps of the steps after it, so one hung step cannot
# eat the others' time.  The two presets also get a --budget (their limit less a margin), so they stop
# starting new cases in time and still write their tables.  Peers missing on the machine (liger-kernel,
# cut-cross-entropy) are installed from wheels in .whl/ when present (pip install --no-index --target, into a
# temporary folder put on PYTHONPATH; the machine's own packages stay as they are).
#
# Usage: bash benchmarks/gpu_suite.sh [--pack] OUT_DIR
#   OUT_DIR   folder for every result: gpu_check/, fit_32b.json, gpu-32b/, gpu-8b/, logs/, SUMMARY.md
#   --pack    leave only SUMMARY.md and results.tar.gz (everything) in OUT_DIR, for the device tool,
#             which brings back at most 8 files
# Environment: PYTHON (default python3), GPU_SUITE_SECONDS (default 525); for tests, GPU_SUITE_CAPS (the four
# steps' caps, default "125 165 120 115") and GPU_SUITE_MIN_STEP (a step with less time left is skipped, 20).
set -u -o pipefail

usage() {
    cat >&2 <<'EOF'
usage: bash benchmarks/gpu_suite.sh [--pack] OUT_DIR

Runs gpu_check, fit_32b and the gpu-32b / gpu-8b presets of `python -m benchmarks` on a CUDA machine,
each under a time limit (about 9 minutes in all), writing everything under OUT_DIR (required).
  --pack   keep only OUT_DIR/SUMMARY.md and OUT_DIR/results.tar.gz (for the device tool)
Peers are installed from .whl/ when missing (README.md, "GPU suite").
EOF
}

PACK=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --pack) PACK=1; shift ;;
        -*) echo "gpu_suite: unknown option $1" >&2; usage; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "gpu_suite: OUT_DIR is required (one folder for all results)" >&2
    usage
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || exit 2
FINAL=$(cd "$1" && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
TOTAL=${GPU_SUITE_SECONDS:-525}
START=$SECONDS
DEADLINE=$((START + TOTAL))
KILL_AFTER=5   # seconds between timeout's TERM and its KILL
BUDGET_MARGIN=35  # a step's --budget is its limit less this: the work in flight, writing tables and plots
MIN_STEP=${GPU_SUITE_MIN_STEP:-20}
export PYTHONUNBUFFERED=1

if [ "$PACK" = 1 ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
else
    WORK=$FINAL
fi
LOGS=$WORK/logs
mkdir -p "$LOGS"
STATUS=$WORK/steps.tsv
: >"$STATUS"

# step name, its own cap in seconds (the later steps' caps are reserved for them)
STEP_NAMES=(gpu_check fit_32b gpu-32b gpu-8b)
read -r -a STEP_CAPS <<<"${GPU_SUITE_CAPS:-125 165 120 115}"
if [ ${#STEP_CAPS[@]} -ne ${#STEP_NAMES[@]} ]; then
    echo "gpu_suite: GPU_SUITE_CAPS needs ${#STEP_NAMES[@]} numbers, got '${GPU_SUITE_CAPS:-}'" >&2
    exit 2
fi

later_caps() {  # sum of the caps of the steps after step $1
    local i sum=0
    for ((i = $1 + 1; i < ${#STEP_CAPS[@]}; i++)); do sum=$((sum + STEP_CAPS[i])); done
    echo "$sum"
}

install_peers() {
    local missing
    missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(d for m, d in (("liger_kernel", "liger_kernel"), ("cut_cross_entropy", "cut_cross_entropy"))
               if importlib.util.find_spec(m) is None))
EOF
    ) || { echo "gpu_suite: $PY does not run" >&2; return 1; }
    if [ -z "$missing" ]; then
        echo "gpu_suite: peers already installed"
        return 0
    fi
    local wheels=() name w
    for name in $missing; do
        w=$(ls "$REPO"/.whl/"$name"-*.whl 2>/dev/null | sort -V | tail -n 1)
        if [ -n "$w" ]; then
            wheels+=("$w")
        else
            echo "gpu_suite: $name missing and no .whl/$name-*.whl: it is reported as skipped"
        fi
    done
    [ ${#wheels[@]} -eq 0 ] && return 0
    local site
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite_site.XXXXXX")
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
            >"$LOGS/pip.log" 2>&1; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_suite: installed ${wheels[*]##*/}"
    else
        echo "gpu_suite: pip install of ${wheels[*]##*/} failed (logs/pip.log); peers reported as skipped"
    fi
}

# run_step INDEX COMMAND...: under timeout; one line of steps.tsv (name, status, rc, seconds, limit)
run_step() {
    local index=$1; shift
    local name=${STEP_NAMES[$index]}
    local limit=$((DEADLINE - SECONDS - $(later_caps "$index")))
    if [ "$limit" -lt "$MIN_STEP" ]; then
        printf '%s\tskipped\t-\t0\t%s\n' "$name" "$limit" >>"$STATUS"
        echo "gpu_suite: $name skipped: ${limit}s left for it"
        return
    fi
    # the --budget placeholder is filled in here, from the limit
    local budget=$((limit - BUDGET_MARGIN)) args=() a
    [ "$budget" -lt 10 ] && budget=10
    for a in "$@"; do args+=("${a//@BUDGET@/$budget}"); done
    echo "gpu_suite: $name (limit ${limit}s): ${args[*]}"
    local t0=$SECONDS rc status
    timeout --kill-after="$KILL_AFTER" "$limit" "${args[@]}" >"$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=TIMED-OUT ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" >>"$STATUS"
    echo "gpu_suite: $name $status (rc $rc) in $((SECONDS - t0))s"
    if [ "$status" != ok ]; then
        tail -n 15 "$LOGS/$name.log" | sed "s/^/    [$name] /"
    fi
}

{
    echo "gpu_suite: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), repo $REPO, results in $FINAL, ${TOTAL}s in all"
    "$PY" -c 'import torch; print("gpu_suite: torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} | tee "$LOGS/machine.txt"
install_peers

PRESET_PROVIDERS=naive,triton,loss,liger,cce  # the torch backend is the CPU path: not timed on the GPU
run_step 0 "$PY" -m benchmarks.gpu_check --output-dir "$WORK/gpu_check" --skip-timing --split-repeats 3 --budget @BUDGET@
run_step 1 "$PY" -m benchmarks.fit_32b --json "$WORK/fit_32b.json"
run_step 2 "$PY" -m benchmarks --preset gpu-32b --providers "$PRESET_PROVIDERS" --repeats 3 --no-progress \
    --budget @BUDGET@ --output-dir "$WORK/gpu-32b"
run_step 3 "$PY" -m benchmarks --preset gpu-8b --providers "$PRESET_PROVIDERS" --repeats 3 --no-progress \
    --budget @BUDGET@ --output-dir "$WORK/gpu-8b"

SUMMARY=$WORK/SUMMARY.md
{
    echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo
    sed 's/^gpu_suite: //' "$LOGS/machine.txt"
    echo
    echo "| step | status | rc | seconds | limit s |"
    echo "|---|---|---:|---:|---:|"
    while IFS=$'\t' read -r name status rc secs limit; do
        echo "| $name | $status | $rc | $secs | $limit |"
    done <"$STATUS"
    echo
    echo "Total: $((SECONDS - START)) s."
    for md in "$WORK/gpu_check/gpu_check.md" "$WORK/gpu-32b/gpu-32b.md" "$WORK/gpu-8b/gpu-8b.md"; do
        [ -f "$md" ] && { echo; cat "$md"; }
    done
    if [ -f "$LOGS/fit_32b.log" ]; then
        echo
        echo "## fit_32b"
        echo
        echo '```'
        grep -v '^\s*$' "$LOGS/fit_32b.log" | tail -n 25
        echo '```'
    fi
} >"$SUMMARY"

echo
echo "gpu_suite: done in $((SECONDS - START))s; summary $FINAL/SUMMARY.md"
column -t -s $'\t' "$STATUS" 2>/dev/null || cat "$STATUS"
failed=$(awk -F'\t' '$2 != "ok"' "$STATUS" | wc -l)

if [ "$PACK" = 1 ]; then
    cp "$SUMMARY" "$FINAL/SUMMARY.md"
    tar -czf "$FINAL/results.tar.gz" -C "$WORK" .
    rm -rf "$WORK"
fi
[ "$failed" -eq 0 ]
