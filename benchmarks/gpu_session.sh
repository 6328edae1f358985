#!/usr/bin/env bash
# One prepared GPU session (a CUDA machine, repository root): the kernel tests on CUDA, the
# kernels' accuracy and determinism at realistic sizes, the issue's target table, the
# per-kernel breakdown (with the experimental one-kernel backward), that backward's accuracy
# (fused), the target table in float16 and at head dims 32, 96, 256 (what auto needs to run
# those; target-fp32 on request) and the tile sweep, each under its own time limit. $STAGES
# names the stages to run, in order (default: target breakdown fused tests accuracy
# target-fp16 target-dims tiles). Results go to $OUT
# (default benchmarks/results); every stage's output also goes to $OUT/session.log.
#
#   OUT=/tmp/gpu BENCH_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh
#   STAGES="breakdown target" bash benchmarks/gpu_session.sh
#
# All stages take about 10-11 minutes on an H200 (estimated from earlier runs: target ~60 s,
# breakdown ~100 s with the fused variants, tests ~150 s, accuracy and fused ~45 s each, each
# extra target table ~60-70 s, tiles 80 s): where one command may run at most 10 minutes,
# split them, e.g. STAGES="target breakdown fused tests", then
# STAGES="accuracy target-fp16 target-dims tiles".
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/session.log"
stage() {  # stage <seconds> <name> <command...>
    local limit=$1 name=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 60
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}
{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit ${BENCH_COMMIT:-unknown}"
} 2>&1 | tee -a "$LOG"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
    echo "pip install failed: importing from the tree" | tee -a "$LOG"
    ln -sfn ../energy_attn_kernels energy_attn/kernels  # pyproject maps it to energy_attn.kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import energy_attn.kernels.hopfield_descent as k; print('kernels from', k.__file__)" 2>&1 | tee -a "$LOG"
for name in ${STAGES:-target breakdown fused tests accuracy target-fp16 target-dims tiles}; do
    case $name in
        target) stage 150 target python3 benchmarks/kernels.py --target --out "$OUT" ;;
        target-fp16) stage 120 target-fp16 python3 benchmarks/kernels.py --target --dtype fp16 \
            --out "$OUT" ;;
        target-fp32) stage 240 target-fp32 python3 benchmarks/kernels.py --target --dtype fp32 \
            --out "$OUT" ;;
        target-dims) stage 150 target-dims python3 benchmarks/kernels.py --target \
            --head-dims 32 96 256 --out "$OUT" ;;
        accuracy) stage 45 accuracy python3 benchmarks/kernel_accuracy.py --out "$OUT" ;;
        # -v: one line per test as it finishes (an xdist run once hung after its last test;
        # the log still says which passed). The offline compile checks need no GPU: CI runs them.
        tests) stage 200 tests python3 -m pytest tests/kernels tests/ops/test_auto_backend.py \
            --deselect tests/kernels/test_compile_check.py -v -rfE -n 8 -p no:cacheprovider \
            -p no:benchmark -W ignore::DeprecationWarning ;;
        breakdown) stage 200 breakdown python3 benchmarks/kernel_breakdown.py --out "$OUT" ;;
        fused) stage 60 fused python3 benchmarks/kernel_accuracy.py --fused tma --out "$OUT" ;;
        tiles) stage 80 tiles python3 benchmarks/kernels.py --tiles --reps 10 --out "$OUT" ;;
        *) echo "unknown stage $name" | tee -a "$LOG" ;;
    esac
done
