#!/usr/bin/env bash
# Issue 17 on the H200 (the device tool's `nvidia-h200`), one call of at most ~9.5 minutes (timeout_s=600), run from
# the repo root with the daemon's wheels carried (`/work/shared/tools/device-wheels --daemon` -> `.whl`,
# `carry=[".whl"]`):
#   mkdir -p bench_out/before17 && git archive 47e6b20 sloth_daemon | tar x -C bench_out/before17   # here, first
#   bash benchmarks/device_loop17.sh          # carry=[".whl", "bench_out/before17"]
#   TRAIN_HOST=0 LOOP_TIMEOUT=560 EXAMPLES=500,500 CONFIGS=after,nf4 bash benchmarks/device_loop17.sh
# Step 2 is the main one: benchmarks/bench_loop on the 8B shape (32 layers, random weights, bf16 checkpoint, byte-level vocabulary), every
# configuration on a fresh daemon in the same call: `after` (the embedded engine serving the bf16 base, updates on
# the NF4 base with the kernels and offload: today's GPU defaults) and `nf4` (the same, the engine serving from the
# 4-bit NF4 base: `embedded.quantization = "nf4"`, issue 17's memory item). Per update of 500 taught pairs, then 500
# more: trigger -> ready, training (steps, tokens/s), gate, write, swap, feedback -> served; serving p50/p99 with 1
# and 16 streaming clients idle and while the update trains; idle serving tokens/s; GPU peak memory (nvidia-smi, GPU
# 0, engine + trainer) idle and during the update. The gate's bounds are opened (random weights answer noise, so
# its KL and answer checks would reject every update; the phases are timed the same), as in runs 19-20.
# Each update of bench_loop takes 45-60 s there (runs 19-20), so 2 configurations x 2 updates with daemon starts
# need ~6-7 minutes: with TRAIN_HOST=1 a cut at LOOP_TIMEOUT=420 may lose nf4's second update (rows are saved as they
# come); TRAIN_HOST=0 LOOP_TIMEOUT=560 gives the loop the whole call.
# -> $OUT/loop17.json (the rows), loop17.txt (the tables), gpu.txt (nvidia-smi), logs.tgz (daemon and trainer logs,
# no model files). Record the figures in docs/gpu-notes.md (Session 7) and README's "How fast the loop is".
set -u
# shellcheck source=benchmarks/device_env.sh
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee -a "$OUT/gpu.txt"
# 1. The trainer's host side and the gate's batching on the GPU (~90 s): benchmarks/bench_train_host on the 8B shape
#    with 8 layers (NF4 base, kernels off), the previous scoring (main 47e6b20: 8 examples per forward, per-example
#    syncs) against the current one (length-sorted batches of 4096 padded tokens, one sync per forward) in one call.
#    -> $OUT/train_host.json, train_host.txt
if [ "${TRAIN_HOST:-1}" = 1 ]; then
    python3 -c "from pathlib import Path; from benchmarks.bench_loop import build_big
print(build_big(Path('/tmp/bench/host'), 8))" 2>&1 | tail -1
    before=bench_out/before17  # carried: the device gets no git history
    [ -d "$before/sloth_daemon" ] || before=47e6b20
    timeout "${HOST_TIMEOUT:-150}" python3 -m benchmarks.bench_train_host --device cuda --threads 4 \
        --shapes /tmp/bench/host/llama-8b-shape --new 200 --replay 100 --anchors 32 --step-tokens 4096 --repeat 2 \
        --before "$before" \
        --work /tmp/bench/train_host --out "$OUT/train_host.json" 2>&1 | grep -v Warning | tee "$OUT/train_host.txt" \
        | tail -8
fi
# 2. The loop, after and nf4.
G="--env SLOTH_GATE_MAX_ANCHOR_KL=1000 --env SLOTH_GATE_MAX_ANCHOR_KL_RISE=1000"
G="$G --env SLOTH_GATE_MAX_ANCHOR_LOSS_INCREASE=1000 --env SLOTH_GATE_MAX_RECALL_LOSS_INCREASE=1000"
G="$G --env SLOTH_GATE_MAX_ANSWERS_LOST=1 --env SLOTH_GATE_MAX_ANCHOR_ANSWERS_LOST=1"
# shellcheck disable=SC2086
timeout "${LOOP_TIMEOUT:-420}" python3 -m benchmarks.bench_loop --examples "${EXAMPLES:-500,500}" \
    --configs "${CONFIGS:-after,nf4}" --clients 1,16 --requests 2 --max-tokens 16 --recall 3 --window 2 \
    --work /tmp/bench/loop $G --out "$OUT/loop17.json" 2>&1 | grep -v Warning | tee "$OUT/loop17.txt" | tail -30
tar czf "$OUT/logs.tgz" -C /tmp/bench --exclude models --exclude '*.safetensors' --exclude '*.bin' \
    --exclude '*.db*' . 2>/dev/null
true
