# Common setup of the GPU machine's scripts (the `device` tool; see docs/gpu-notes.md), sourced from the repo root
# by benchmarks/device_run.sh and benchmarks/device_retention.sh:
#   OUT       where files that come back go (the tool sets it; /tmp/out when run by hand), created
#   SITE      where the carried wheels (`.whl/*.whl`) are installed (default /tmp/site)
#   /tmp/bench  scratch for logs and per-run files, created
# Installs the wheels, makes the repo's packages importable under their installed names (`kernels/` as
# sloth_kernels, `replay/` as sloth_replay, for the folders present) and exports PYTHONPATH and PYTHONUNBUFFERED.
OUT=${OUT:-/tmp/out}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" /tmp/bench /tmp/alias
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"
for pkg in kernels:sloth_kernels replay:sloth_replay; do
    if [ -d "${pkg%%:*}" ]; then ln -sfn "$PWD/${pkg%%:*}" "/tmp/alias/${pkg##*:}"; fi
done
export PYTHONPATH=$SITE:/tmp/alias:$PWD PYTHONUNBUFFERED=1
