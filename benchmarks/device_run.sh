#!/usr/bin/env bash
# One call on the GPU machine (the `device` tool; see docs/gpu-notes.md), run from the repo root with `.whl` carried:
#   bash benchmarks/device_run.sh            # the whole QLoRA step comparison, then the CUDA kernel tests
#   CONFIGS=ours_offload,hf STEPS=5 TESTS=0 bash benchmarks/device_run.sh
#   CONFIGS=hf,ours STEPS=1 WARMUP=1 TESTS=0 EXTRA_ARGS=--tiny SITE=/tmp/site-test bash benchmarks/device_run.sh  # plumbing, CPU
# Installs the carried wheels (bitsandbytes; liger-kernel/unsloth with `device-wheels --peers`) into /tmp/site,
# makes `sloth_kernels` importable, and leaves at most three files under $OUT (the tool brings back eight at most):
# qlora_step.json, tests.txt, bench.tgz (per-configuration logs, and profiles when PROFILE=1).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/bench /tmp/alias
SITE=${SITE:-/tmp/site}
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"
ln -sfn "$PWD/kernels" /tmp/alias/sloth_kernels
export PYTHONPATH=$SITE:/tmp/alias:$PWD
# shellcheck disable=SC2206
extra=(${EXTRA_ARGS:-})
if [ "${PROFILE:-0}" = 1 ]; then extra+=(--profile /tmp/bench/profile); fi
python3 -m benchmarks.bench_qlora_step --configs "${CONFIGS:-ours_offload,hf,ours,unsloth,hf_bf16,liger}" \
    --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" --timeout "${CONFIG_TIMEOUT:-150}" \
    --out "$OUT/qlora_step.json" --logdir /tmp/bench/logs "${extra[@]}" 2>&1 | grep -v Warning | tail -14
if [ "${TESTS:-1}" = 1 ]; then
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q tests/kernels -k cuda -p no:cacheprovider 2>&1 | tail -5 \
        | tee "$OUT/tests.txt"
fi
tar czf "$OUT/bench.tgz" -C /tmp/bench .
