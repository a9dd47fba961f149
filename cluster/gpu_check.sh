#!/usr/bin/env bash
# The GPU checks and figures of issue #26 (train.step: eager | compile | graph) in one call, from the
# repository root on a machine with one CUDA GPU; everything lands in $OUT (default gpu_check/):
#
#   OUT=/tmp/out bash cluster/gpu_check.sh
#
# 1. tests.txt: the step-mode tests, the CUDA ones included (graph vs eager per-step losses, evaluation
#    graphs vs eager evaluation, inductor vs eager), first, so a broken graph path shows before any timing.
# 2. bench.json / bench.txt: python -m harness.bench --device cuda --repeat 3 (eager and graph, the default
#    CUDA modes), without the sections that are the same on any machine (memory: counted on fake tensors;
#    expert_parallel: two CPU ranks over gloo).
# 3. epochs.json: whole CIFAR-100-sized epochs (50k + 10k generated images, batch 512) through train_loop,
#    once per train.step (eager, graph, compile), 3 epochs each; epoch 1 holds the capture or compilation.
#
# Each part has its own time limit and the next runs even if one fails; the exit status is the first
# failure's. About 10 minutes on an H100/H200 (estimated, not yet run).
set -u
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
status=0
run() {  # run LIMIT_SECONDS NAME COMMAND...: output to $OUT/NAME.txt, status kept
    local limit=$1 name=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 5 "$OUT/$name.txt"
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return 0
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
run 240 tests python -m pytest -q -rs tests/test_step_modes.py
run 420 bench python -m harness.bench --device cuda --repeat 3 --skip memory --skip expert_parallel \
    --json "$OUT/bench.json"
run 420 epochs python -c "
import json, sys, torch
from harness.bench.epoch import train_loop_epochs
figures = train_loop_epochs(torch.device('cuda'))
json.dump(figures, open(sys.argv[1], 'w'), indent=2)
for step, run in figures.items():
    print(step, run['step_mode'], [round(e['epoch_s'], 2) for e in run['epochs']], run['fallback'])
" "$OUT/epochs.json"
exit $status
