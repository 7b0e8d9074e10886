#!/usr/bin/env bash
# The GPU suite in one go, planned at 7 min 40 s (README.md, "GPU suite"); not yet run on a GPU:
#
#   1. gpu_check  python -m benchmarks.gpu_check: correctness at N=4096 (H=4096, 5120); judge_loss phase by
#                 phase at N=16,384, H=5,120; forward/backward timed apart at N=16,384 / 16,400 for naive,
#                 triton, triton-low, loss, liger, liger-fp32 and cce
#   2. fit_32b    python -m benchmarks.fit_32b: REAL steps of a Qwen3-32B-shaped LoRA judge, fused head then naive
#   3. gpu-32b    python -m benchmarks --preset gpu-32b (naive, triton, loss, liger, cce)
#   4. gpu-8b     python -m benchmarks --preset gpu-8b (the same)
#
# Every step runs under `timeout`: its share of the total is its own cap plus whatever the steps before it
# left unused, less the caps of the steps after it, so one hung step cannot eat the others' time.  A step
# that fails or times out is recorded and the suite goes on to the next; the exit status is 0 only when
# every step ran and passed.  gpu_check and the presets also get a --budget (their limit less a margin), so
# they stop starting new work in time and still write their tables; gpu_check and fit_32b write their files
# as they go.  SUMMARY.md (and with --pack the tarball) is rewritten before the first step, every
# GPU_SUITE_REFRESH seconds while a step runs, after every step, and on SIGTERM/SIGINT, so a run killed at
# the device tool's limit still returns everything done so far.  Peers missing on the machine (liger-kernel,
# cut-cross-entropy) are installed from wheels in .whl/ when present (pip install --no-index --target, into a
# temporary folder put on PYTHONPATH; the machine's own packages stay as they are).
#
# Usage: bash benchmarks/gpu_suite.sh [--pack] [--steps NAMES] [--plan] OUT_DIR
#   OUT_DIR   folder for every result: gpu_check/, fit_32b.json, gpu-32b/, gpu-8b/, logs/, SUMMARY.md
#   --pack    leave only SUMMARY.md and results.tar.gz (everything) in OUT_DIR, for the device tool,
#             which brings back at most 8 files
#   --steps   comma-separated subset of the steps, in suite order (to rerun one that failed)
#   --plan    print the steps, their caps, commands and the planned time, and run nothing
# Environment: PYTHON (default python3); GPU_SUITE_CAPS (the four steps' caps in seconds, default
# "180 150 65 45"); GPU_SUITE_SECONDS (the steps' total, default the sum of the selected caps);
# GPU_SUITE_MIN_STEP (a step with less time left is skipped, 20); GPU_SUITE_REFRESH (seconds between
# rewrites of SUMMARY.md / the tarball while a step runs, 20).
set -u -o pipefail

usage() {
    cat >&2 <<'EOF'
usage: bash benchmarks/gpu_suite.sh [--pack] [--steps NAMES] [--plan] OUT_DIR

Runs gpu_check, fit_32b and the gpu-32b / gpu-8b presets of `python -m benchmarks` on a CUDA machine,
each under a time limit (planned at 7 min 40 s in all), writing everything under OUT_DIR (required) as
it goes.
  --pack         keep only OUT_DIR/SUMMARY.md and OUT_DIR/results.tar.gz (for the device tool)
  --steps NAMES  comma-separated subset of gpu_check,fit_32b,gpu-32b,gpu-8b (e.g. to rerun one)
  --plan         print the steps, caps, commands and planned time; run nothing
Peers are installed from .whl/ when missing (README.md, "GPU suite").
EOF
}

ALL_STEPS=(gpu_check fit_32b gpu-32b gpu-8b)
SETUP_SECONDS=20  # allowance for what runs outside the steps: the machine line, installing the peers, packing

PACK=0
PLAN=0
SELECTED=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --pack) PACK=1; shift ;;
        --plan) PLAN=1; shift ;;
        --steps)
            [ $# -ge 2 ] || { echo "gpu_suite: --steps needs a list of steps" >&2; usage; exit 2; }
            SELECTED=$2; shift 2 ;;
        -*) echo "gpu_suite: unknown option $1" >&2; usage; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "gpu_suite: OUT_DIR is required (one folder for all results)" >&2
    usage
    exit 2
fi

read -r -a ALL_CAPS <<<"${GPU_SUITE_CAPS:-180 150 65 45}"
if [ ${#ALL_CAPS[@]} -ne ${#ALL_STEPS[@]} ]; then
    echo "gpu_suite: GPU_SUITE_CAPS needs ${#ALL_STEPS[@]} numbers, got '${GPU_SUITE_CAPS:-}'" >&2
    exit 2
fi
STEP_NAMES=()
STEP_CAPS=()
if [ -z "$SELECTED" ]; then
    STEP_NAMES=("${ALL_STEPS[@]}")
    STEP_CAPS=("${ALL_CAPS[@]}")
else
    IFS=',' read -r -a wanted <<<"$SELECTED"
    for w in "${wanted[@]}"; do
        case " ${ALL_STEPS[*]} " in
            *" $w "*) ;;
            *) echo "gpu_suite: --steps takes a subset of ${ALL_STEPS[*]}, got '$w'" >&2; exit 2 ;;
        esac
    done
    for i in "${!ALL_STEPS[@]}"; do  # suite order, whatever the order asked for
        for w in "${wanted[@]}"; do
            if [ "$w" = "${ALL_STEPS[$i]}" ]; then
                STEP_NAMES+=("${ALL_STEPS[$i]}")
                STEP_CAPS+=("${ALL_CAPS[$i]}")
                break
            fi
        done
    done
fi
CAPS_SUM=0
for c in "${STEP_CAPS[@]}"; do CAPS_SUM=$((CAPS_SUM + c)); done
TOTAL=${GPU_SUITE_SECONDS:-$CAPS_SUM}
KILL_AFTER=5      # seconds between timeout's TERM and its KILL
BUDGET_MARGIN=25  # a step's --budget is its limit less this: the work in flight, writing tables and plots
MIN_STEP=${GPU_SUITE_MIN_STEP:-20}
REFRESH=${GPU_SUITE_REFRESH:-20}
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# step_command NAME WORK: fills CMD with the step's command line (@BUDGET@ is filled in from its limit)
step_command() {
    local presets=naive,triton,loss,liger,cce  # the torch backend is the CPU path: not timed on the GPU
    case "$1" in
        gpu_check) CMD=("$PY" -m benchmarks.gpu_check --output-dir "$2/gpu_check" --skip-timing --split-repeats 3
                        --budget @BUDGET@) ;;
        fit_32b) CMD=("$PY" -m benchmarks.fit_32b --json "$2/fit_32b.json") ;;
        gpu-32b|gpu-8b) CMD=("$PY" -m benchmarks --preset "$1" --providers "$presets" --repeats 3 --no-progress
                             --budget @BUDGET@ --output-dir "$2/$1") ;;
    esac
}

if [ "$PLAN" = 1 ]; then
    echo "gpu_suite plan: ${#STEP_NAMES[@]} step(s), each under timeout (its cap plus time the steps before it left)"
    for i in "${!STEP_NAMES[@]}"; do
        step_command "${STEP_NAMES[$i]}" OUT_DIR
        echo "  ${STEP_NAMES[$i]}: cap ${STEP_CAPS[$i]} s: ${CMD[*]}"
    done
    echo "planned total: $((TOTAL + SETUP_SECONDS)) s (steps ${TOTAL} s + setup ${SETUP_SECONDS} s)"
    exit 0
fi

mkdir -p "$1" || exit 2
FINAL=$(cd "$1" && pwd)
cd "$REPO" || exit 2
START=$SECONDS
DEADLINE=$((START + TOTAL))
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
SUMMARY=$WORK/SUMMARY.md
RUNNING=""       # the step in progress
RUNNING_T0=0
RUNNING_LIMIT=0
CHILD=""         # its timeout process

later_caps() {  # sum of the caps of the steps after step $1
    local i sum=0
    for ((i = $1 + 1; i < ${#STEP_CAPS[@]}; i++)); do sum=$((sum + STEP_CAPS[i])); done
    echo "$sum"
}

# write_summary STATE: SUMMARY.md from what is on disk now (finished steps, the running one, the rest pending)
write_summary() {
    local state=$1 name status rc secs limit done_steps=" "
    {
        echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M:%S UTC'): $state"
        echo
        [ -f "$LOGS/machine.txt" ] && sed 's/^gpu_suite: //' "$LOGS/machine.txt" && echo
        echo "Planned: $((TOTAL + SETUP_SECONDS)) s (steps' caps ${STEP_CAPS[*]} s for ${STEP_NAMES[*]}," \
             "setup ${SETUP_SECONDS} s)."
        echo
        echo "| step | status | rc | seconds | limit s |"
        echo "|---|---|---:|---:|---:|"
        while IFS=$'\t' read -r name status rc secs limit; do
            echo "| $name | $status | $rc | $secs | $limit |"
            done_steps+="$name "
        done <"$STATUS"
        for name in "${STEP_NAMES[@]}"; do
            case "$done_steps" in *" $name "*) continue ;; esac
            if [ "$name" = "$RUNNING" ]; then
                echo "| $name | running | - | $((SECONDS - RUNNING_T0)) | $RUNNING_LIMIT |"
            else
                echo "| $name | not run yet | - | - | - |"
            fi
        done
        echo
        echo "Elapsed: $((SECONDS - START)) s."
        local md
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
    } >"$SUMMARY.tmp" && mv -f "$SUMMARY.tmp" "$SUMMARY"
}

# save_progress STATE: SUMMARY.md, and with --pack its copy and the tarball in OUT_DIR (each replaced whole)
save_progress() {
    write_summary "$1"
    if [ "$PACK" = 1 ]; then
        cp "$SUMMARY" "$FINAL/SUMMARY.md.tmp" && mv -f "$FINAL/SUMMARY.md.tmp" "$FINAL/SUMMARY.md"
        # a step may replace a file while tar reads the folder (tar then warns and exits non-zero): the
        # archive is kept when it is whole
        tar -czf "$FINAL/results.tar.gz.tmp" -C "$WORK" --exclude='*.tmp' . 2>/dev/null
        gzip -t "$FINAL/results.tar.gz.tmp" 2>/dev/null && mv -f "$FINAL/results.tar.gz.tmp" "$FINAL/results.tar.gz"
    fi
}

on_signal() {
    trap - TERM INT
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
    if [ -n "$RUNNING" ]; then
        printf '%s\tINTERRUPTED\t-\t%s\t%s\n' "$RUNNING" "$((SECONDS - RUNNING_T0))" "$RUNNING_LIMIT" >>"$STATUS"
        RUNNING=""
    fi
    save_progress "interrupted after $((SECONDS - START)) s"
    [ "$PACK" = 1 ] && rm -rf "$WORK"
    exit 130
}
trap on_signal TERM INT

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

# run_step INDEX: under timeout, in the background, SUMMARY.md refreshed while it runs;
# one line of steps.tsv (name, status, rc, seconds, limit)
run_step() {
    local index=$1
    local name=${STEP_NAMES[$index]}
    local limit=$((DEADLINE - SECONDS - $(later_caps "$index")))
    if [ "$limit" -lt "$MIN_STEP" ]; then
        printf '%s\tskipped\t-\t0\t%s\n' "$name" "$limit" >>"$STATUS"
        echo "gpu_suite: $name skipped: ${limit}s left for it"
        return
    fi
    local budget=$((limit - BUDGET_MARGIN)) args=() a
    [ "$budget" -lt 10 ] && budget=10
    step_command "$name" "$WORK"
    for a in "${CMD[@]}"; do args+=("${a//@BUDGET@/$budget}"); done
    echo "gpu_suite: $name (limit ${limit}s): ${args[*]}"
    RUNNING=$name
    RUNNING_T0=$SECONDS
    RUNNING_LIMIT=$limit
    save_progress "running $name"
    timeout --kill-after="$KILL_AFTER" "$limit" "${args[@]}" >"$LOGS/$name.log" 2>&1 </dev/null &
    CHILD=$!
    local last=$SECONDS rc status
    while kill -0 "$CHILD" 2>/dev/null; do
        sleep 0.5
        if [ $((SECONDS - last)) -ge "$REFRESH" ]; then
            save_progress "running $name"
            last=$SECONDS
        fi
    done
    wait "$CHILD"
    rc=$?
    CHILD=""
    RUNNING=""
    case $rc in
        0) status=ok ;;
        124|137) status=TIMED-OUT ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - RUNNING_T0))" "$limit" >>"$STATUS"
    echo "gpu_suite: $name $status (rc $rc) in $((SECONDS - RUNNING_T0))s"
    if [ "$status" != ok ]; then
        tail -n 15 "$LOGS/$name.log" | sed "s/^/    [$name] /"
    fi
    save_progress "after $name"
}

save_progress "starting"
{
    echo "gpu_suite: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), repo $REPO, results in $FINAL, ${TOTAL}s for the steps"
    "$PY" -c 'import torch; print("gpu_suite: torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} | tee "$LOGS/machine.txt"
install_peers

for i in "${!STEP_NAMES[@]}"; do
    run_step "$i"
done

failed=$(awk -F'\t' '$2 != "ok"' "$STATUS" | wc -l)
if [ "$failed" -eq 0 ]; then
    save_progress "complete, every step passed"
else
    save_progress "complete, $failed step(s) failed, timed out or skipped"
fi
echo
echo "gpu_suite: done in $((SECONDS - START))s; summary $FINAL/SUMMARY.md"
column -t -s $'\t' "$STATUS" 2>/dev/null || cat "$STATUS"
[ "$PACK" = 1 ] && rm -rf "$WORK"
[ "$failed" -eq 0 ]
