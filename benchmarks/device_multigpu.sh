#!/usr/bin/env bash
# Issue 16 on the 2-GPU machine (the device tool's `nvidia-h200-x2`), run from the repo root with `.whl` carried
# (the daemon's dependencies: /work/shared/tools/device-wheels --daemon), in about 8 minutes:
#   bash benchmarks/device_multigpu.sh
#   LOOP_TIMEOUT=240 FSDP_TIMEOUT=260 STEPS=60 EXAMPLES=50 QUANTIZE=nf4 bash benchmarks/device_multigpu.sh
# 1. Placement (item 1): benchmarks/bench_loop on the 8B shape (32 layers, random weights, bf16), the embedded engine
#    serving on GPU 0 (SLOTH_DEVICE=cuda:0), updates on GPU 1 (SLOTH_TRAIN_DEVICES=1, the warm trainer, NF4 base):
#    serving p50/p99 idle and while the update trains (1 and 4 streaming clients), and GPU 0's peak memory during the
#    update (its sampler reads GPU 0 only: flat = the trainer stays off the serving GPU). Kernels off (their first
#    compile would eat the call), one batch per step (SLOTH_TRAIN_STEP_TOKENS=0) so training lasts long enough to be
#    measured, anchors off. -> $OUT/placement.json, placement.txt
# 2. FSDP (item 2): benchmarks/bench_fsdp on the same checkpoint: one update (8 steps of 8 taught pairs, NF4 base,
#    kernels off) on one GPU, then across both (torchrun + FSDP2, the QLoRA-FSDP recipe; each process quantises on
#    the host first, so its load phase is longer): losses side by side, load/train seconds, tokens/s, peak memory
#    per GPU. QUANTIZE=none compares bf16 bases instead. -> $OUT/fsdp.json, fsdp.txt
# Also $OUT/gpus.txt (nvidia-smi) and $OUT/logs.tgz (daemon and trainer logs, no model files).
set -u
# shellcheck source=benchmarks/device_env.sh
source benchmarks/device_env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/gpus.txt"
timeout "${LOOP_TIMEOUT:-240}" python3 -m benchmarks.bench_loop --configs after --examples "${EXAMPLES:-50}" \
    --clients 1,4 --requests 3 --max-tokens 16 --recall 1 --window 2 --work /tmp/bench/loop \
    --out "$OUT/placement.json" --env SLOTH_DEVICE=cuda:0 --env SLOTH_TRAIN_DEVICES=1 \
    --env SLOTH_ANCHORS_ENABLED=false --env SLOTH_TRAIN_STEPS="${STEPS:-60}" --env SLOTH_TRAIN_STEP_TOKENS=0 \
    --env SLOTH_TRAIN_KERNELS=off 2>&1 | grep -v Warning | tail -25 | tee "$OUT/placement.txt"
model=/tmp/bench/loop/models/llama-8b-shape
[ -f "$model/config.json" ] || model=""  # bench_loop did not get that far: bench_fsdp builds its own
timeout "${FSDP_TIMEOUT:-260}" python3 -m benchmarks.bench_fsdp ${model:+--model "$model"} --steps 8 --batch 8 \
    --quantize "${QUANTIZE:-nf4}" --timeout 170 --work /tmp/bench/fsdp --out "$OUT/fsdp.json" 2>&1 \
    | grep -v Warning | tail -25 | tee "$OUT/fsdp.txt"
tar czf "$OUT/logs.tgz" -C /tmp/bench --exclude models --exclude '*.safetensors' --exclude '*.bin' . 2>/dev/null
