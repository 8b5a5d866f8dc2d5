#!/usr/bin/env bash
# Issue 16 on the 2-GPU machine (the device tool's `nvidia-h200-x2`), run from the repo root with `.whl` carried
# (the daemon's dependencies: /work/shared/tools/device-wheels --daemon), in about 4 minutes (one call; the tool
# allows 600 s a command):
#   bash benchmarks/device_multigpu.sh
#   FSDP_TIMEOUT=540 LOAD_TIMEOUT=90 RUN_TIMEOUT=170 BEFORE=1 PLACEMENT=1 bash benchmarks/device_multigpu.sh
# 1. FSDP (item 2): benchmarks/bench_fsdp on the 8B shape (32 layers, random weights, bf16, built here in ~20 s):
#    a. load phase: the NF4 base loaded by one process (quantised on its GPU) and by two torchrun processes the way
#       the FSDP trainer loads it now (each weight quantised on the process's GPU, kept on the host; run 21's code
#       quantised on the host with one thread and did not finish in 170 s); BEFORE=1 adds that old load as a row,
#       cut at LOAD_TIMEOUT. Each row: slowest process's seconds, ratio to one process, peak host memory, and
#       whether the 4-bit weights equal one process's (checksum).
#    b. one update (8 steps of 8 taught pairs, NF4 base, kernels off) on one GPU, then across both (torchrun +
#       FSDP2, the QLoRA-FSDP recipe): losses side by side, load/train seconds, tokens/s, peak memory per GPU.
#    QUANTIZE=none compares bf16 bases instead. -> $OUT/fsdp.json (written after every row), fsdp.txt
# 2. Placement (item 1; measured in run 21, so only with PLACEMENT=1, after the FSDP part): benchmarks/bench_loop on
#    the 8B shape, the embedded engine serving on GPU 0 (SLOTH_DEVICE=cuda:0), updates on GPU 1
#    (SLOTH_TRAIN_DEVICES=1, the warm trainer, NF4 base): serving p50/p99 idle and while the update trains (1 and 4
#    streaming clients), and GPU 0's peak memory during the update. Kernels off, one batch per step
#    (SLOTH_TRAIN_STEP_TOKENS=0), anchors off. -> $OUT/placement.json, placement.txt
# Also $OUT/gpus.txt (nvidia-smi) and $OUT/logs.tgz (trainer logs and per-run files, no model files).
set -u
# shellcheck source=benchmarks/device_env.sh
source benchmarks/device_env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/gpus.txt"
rows=single,after
[ "${BEFORE:-0}" = 1 ] && rows=single,before,after
timeout "${FSDP_TIMEOUT:-420}" python3 -m benchmarks.bench_fsdp --layers 32 --steps 8 --batch 8 \
    --quantize "${QUANTIZE:-nf4}" --load-rows "$rows" --load-timeout "${LOAD_TIMEOUT:-90}" \
    --timeout "${RUN_TIMEOUT:-150}" --work /tmp/bench/fsdp --out "$OUT/fsdp.json" 2>&1 \
    | grep -v Warning | tail -30 | tee "$OUT/fsdp.txt"
if [ "${PLACEMENT:-0}" = 1 ]; then
    timeout "${LOOP_TIMEOUT:-240}" python3 -m benchmarks.bench_loop --configs after --examples "${EXAMPLES:-50}" \
        --clients 1,4 --requests 3 --max-tokens 16 --recall 1 --window 2 --work /tmp/bench/loop \
        --out "$OUT/placement.json" --env SLOTH_DEVICE=cuda:0 --env SLOTH_TRAIN_DEVICES=1 \
        --env SLOTH_ANCHORS_ENABLED=false --env SLOTH_TRAIN_STEPS="${STEPS:-60}" --env SLOTH_TRAIN_STEP_TOKENS=0 \
        --env SLOTH_TRAIN_KERNELS=off 2>&1 | grep -v Warning | tail -25 | tee "$OUT/placement.txt"
fi
tar czf "$OUT/logs.tgz" -C /tmp/bench --exclude models --exclude '*.safetensors' --exclude '*.bin' . 2>/dev/null
