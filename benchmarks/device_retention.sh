#!/usr/bin/env bash
# bench_retention on the GPU machine (the `device` tool; see docs/gpu-notes.md), from the repo root, carrying `.whl`
# (the daemon's wheels: /work/shared/tools/device-wheels --daemon) and the model folder MODEL (default
# bench_out/sloth-tiny). Runs one bench_retention per entry of VARIANTS in parallel, each with THREADS CPU threads
# (its trainer children too), and leaves under $OUT one file, retention.tgz: per variant its JSON and log.
#   VARIANTS="base:train.learning_rate=2e-3 lr1:train.learning_rate=1e-3" ARGS="--rounds 6 --configs defaults" \
#       bash benchmarks/device_retention.sh
# A variant is NAME:SET[,SET...] where each SET is a `--set KEY=VALUE` of bench_retention. With PER_CONFIG=1 each
# variant NAME is also the one configuration it runs (`--configs NAME`): the configurations side by side in parallel,
# then `bench_retention --merge` makes one report of them.
set -u
# shellcheck source=benchmarks/device_env.sh
source benchmarks/device_env.sh
export OMP_NUM_THREADS=${THREADS:-2} MKL_NUM_THREADS=${THREADS:-2}
MODEL=${MODEL:-bench_out/sloth-tiny}
pids=()
for v in ${VARIANTS:-defaults:}; do
    name=${v%%:*}; sets=${v#*:}
    setargs=()
    IFS=, read -ra kv <<< "$sets"
    for s in "${kv[@]}"; do [ -n "$s" ] && setargs+=(--set "$s"); done
    if [ "${PER_CONFIG:-0}" = 1 ]; then setargs+=(--configs "$name"); fi
    # shellcheck disable=SC2086
    timeout ${LIMIT:-530} python3 -m benchmarks.bench_retention --model "$MODEL" ${ARGS:-} "${setargs[@]}" --out "/tmp/bench/retention_$name.json" \
        > "/tmp/bench/$name.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for v in ${VARIANTS:-defaults:}; do
    name=${v%%:*}
    echo "== $name"; grep -v -i "warn\|Loading weights\|gemm_4bit" "/tmp/bench/$name.log" | tail -${TAIL:-12}
done
tar czf "$OUT/retention.tgz" -C /tmp/bench .
