#!/usr/bin/env bash
# One call on the GPU machine (the `device` tool; see docs/gpu-notes.md), run from the repo root with `.whl` carried:
#   bash benchmarks/device_run.sh            # every shape, ours vs Unsloth vs HF+PEFT bf16, then the CUDA kernel tests
#   SHAPES=llama8b-2k CONFIGS=ours_offload,unsloth STEPS=5 TESTS=0 bash benchmarks/device_run.sh
#   TEST_FILES="tests/kernels/test_graph_step.py" SHAPES= bash benchmarks/device_run.sh   # tests only
#   BASE_KERNELS=old/kernels SHAPES=llama8b-2k CONFIGS=ours_offload,unsloth bash benchmarks/device_run.sh  # A/B
#   SHAPES=llama8b-2k CONFIGS=hf_bf16,ours STEPS=1 WARMUP=1 TESTS=0 EXTRA_ARGS=--tiny SITE=/tmp/site-test \
#       bash benchmarks/device_run.sh                                                        # plumbing, CPU
# Setup (wheels, package aliases) is benchmarks/device_env.sh's: carry `.whl` (bitsandbytes; liger-kernel/unsloth with
# `device-wheels --peers`). Leaves at most four files under $OUT (the tool brings back eight at most):
# qlora_step.json, qlora_step_base.json (with BASE_KERNELS), tests.txt, bench.tgz (per-configuration logs, and
# profiles when PROFILE=1).
set -u
# shellcheck source=benchmarks/device_env.sh
source benchmarks/device_env.sh
if [ "${TESTS:-1}" = 1 ]; then  # first: a kernel that fails its CUDA tests makes the figures below moot
    # shellcheck disable=SC2086
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q ${TEST_FILES:-tests/kernels} -k cuda -p no:cacheprovider \
        2>&1 | tail -"${TEST_TAIL:-8}" | tee "$OUT/tests.txt"
fi
# shellcheck disable=SC2206
extra=(${EXTRA_ARGS:-})
if [ "${PROFILE:-0}" = 1 ]; then extra+=(--profile /tmp/bench/profile); fi
SHAPES=${SHAPES-llama8b-2k,daemon-packed,llama3b-4k,qwen7b-4k,llama8b-16k}
CONFIGS=${CONFIGS:-ours_offload,ours_offload_graph,unsloth,hf_bf16}
bench() {  # bench CONFIGS RESULT_FILE LOGDIR: every shape, then its markdown table
    python3 -m benchmarks.bench_qlora_step --shape "$SHAPES" --configs "$1" \
        --steps "${STEPS:-8}" --warmup "${WARMUP:-3}" --timeout "${CONFIG_TIMEOUT:-240}" \
        --out "$2" --logdir "$3" "${extra[@]}" 2>&1 | grep -v Warning \
        | grep "bench_qlora_step\|failed\|Error\|error" | cut -c1-400
    python3 -m benchmarks.bench_qlora_step --markdown "$2"
}
if [ -n "$SHAPES" ]; then
    bench "$CONFIGS" "$OUT/qlora_step.json" /tmp/bench/logs
fi
# A/B in the same call: BASE_KERNELS=DIR (another kernels/ folder, e.g. main's, carried beside the tree under test)
# runs the ours* configurations of CONFIGS again with sloth_kernels taken from DIR: $OUT/qlora_step_base.json.
base_configs=$(tr , '\n' <<< "$CONFIGS" | grep '^ours' | paste -sd, -)
if [ -n "$SHAPES" ] && [ -n "${BASE_KERNELS:-}" ] && [ -n "$base_configs" ]; then
    ln -sfn "$(realpath "$BASE_KERNELS")" /tmp/alias/sloth_kernels
    bench "$base_configs" "$OUT/qlora_step_base.json" /tmp/bench/logs-base
    ln -sfn "$PWD/kernels" /tmp/alias/sloth_kernels
fi
tar czf "$OUT/bench.tgz" -C /tmp/bench .
