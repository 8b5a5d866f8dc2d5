"""One update on one device against the same update across two (torchrun + FSDP2, `sloth_daemon.trainer.fsdp`):
losses side by side, time, throughput and peak memory per GPU. GPU by default (two GPUs); `--tiny` runs sloth-tiny
on CPU in two gloo processes (plumbing; relative figures only).

    python -m benchmarks.bench_fsdp [--tiny] [--model DIR] [--layers 32] [--steps 8] [--batch 8]
                                    [--out benchmarks/results/fsdp.json]

The model: `--model DIR` (e.g. the 8B-shaped checkpoint `benchmarks.bench_loop` saved), else built here as
bench_loop builds it (`build_big`: Llama-3.1-8B shape, random weights, bf16) or sloth-tiny with `--tiny`.
The job is the daemon's (`TrainJob` through `TrainerProcess`, as the updater runs it): `--steps` batches of `--batch`
taught question/answer pairs (bench_loop's `facts`), packed, one eval set of 8 of them, the base quantised as
`--quantize` says (default nf4: the QLoRA-FSDP recipe, README "When one GPU is not enough") on both sides, kernels
off on both sides (off under FSDP). Runs: `single` (one process, CUDA_VISIBLE_DEVICES=0) and `fsdp` (two processes,
CUDA_VISIBLE_DEVICES=0,1). Peak memory: nvidia-smi's used memory of each GPU sampled every 0.2 s during each run
(GiB). A table and JSON (`--out`); `max_rel_loss_diff` is the largest relative difference of a step's loss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_loop import build_big, build_tiny, facts  # noqa: E402
from sloth_daemon.trainer.job import LoraSpec, TrainExample, TrainJob  # noqa: E402
from sloth_daemon.trainer.launch import Launch  # noqa: E402
from sloth_daemon.trainer.process import TrainerProcess  # noqa: E402


class GpuPeaks:
    """nvidia-smi's used memory (MiB) of every GPU, sampled every 0.2 s; `peaks_gib()` per GPU index."""

    def __init__(self):
        self.peak: dict[int, float] = {}
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join(5)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                for line in out.strip().splitlines():
                    i, used = (x.strip() for x in line.split(","))
                    self.peak[int(i)] = max(self.peak.get(int(i), 0.0), float(used))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.2)

    def peaks_gib(self) -> dict[int, float]:
        return {i: round(m / 1024, 2) for i, m in sorted(self.peak.items())}


def make_job(model: Path, out: Path, steps: int, batch: int, device: str, quantize: str) -> TrainJob:
    pairs = facts(steps * batch, 0)
    examples = [TrainExample(id=f"f{i}", kind="chat", prompt=[{"role": "user", "content": q}], answer=a)
                for i, (q, a) in enumerate(pairs)]
    out.mkdir(parents=True, exist_ok=True)
    return TrainJob(base_model=str(model), output_dir=str(out),
                    batches=[examples[i * batch:(i + 1) * batch] for i in range(steps)],
                    eval_sets={"new": examples[:8]}, lora=LoraSpec(), learning_rate=3e-4, max_seq_len=512,
                    quantize=quantize, kernels=False, device=device, seed=0, pack=True)


def run_one(name: str, job: TrainJob, launch: Launch, run_dir: Path, timeout: float) -> dict:
    events: list[dict] = []
    started = time.monotonic()
    with GpuPeaks() as gpus:
        try:
            result = asyncio.run(TrainerProcess(launch).run(job, run_dir, events.append, timeout))
        except Exception as e:  # a failed side is a row with its error, not a lost run
            log = (run_dir / "trainer.log").read_text(errors="replace")[-3000:] if (run_dir / "trainer.log").exists() else ""
            return {"run": name, "error": f"{type(e).__name__}: {e}", "log_tail": log}
    losses = [e["loss"] for e in events if e.get("event") == "progress"]
    train_s = result.phases.get("train")
    return {"run": name, "processes": result.processes, "wall_s": round(time.monotonic() - started, 2),
            "phases": result.phases, "steps": result.steps, "tokens": result.tokens,
            "tokens_per_s": round(result.tokens / train_s, 1) if train_s else None, "losses": losses,
            "eval_new": {"parent": result.eval["new"].parent, "candidate": result.eval["new"].candidate},
            "gpu_peak_gib": gpus.peaks_gib()}


def table(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    lines = []
    if len(ok) == 2:
        a, b = ok
        lines += [f"step | loss {a['run']} | loss {b['run']} | rel. diff", "--- | --- | --- | ---"]
        for i, (x, y) in enumerate(zip(a["losses"], b["losses"]), 1):
            lines.append(f"{i} | {x:.5f} | {y:.5f} | {abs(x - y) / max(abs(x), 1e-12):.2e}")
        lines.append("")
    lines += ["run | processes | load s | train s | tok/s | eval new before/after | peak GiB per GPU | error",
              "--- | --- | --- | --- | --- | --- | --- | ---"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['run']} | - | - | - | - | - | - | {r['error'][:200]}")
            continue
        ev = r["eval_new"]
        lines.append(f"{r['run']} | {r['processes']} | {r['phases'].get('load')} | {r['phases'].get('train')} | "
                     f"{r['tokens_per_s']} | {ev['parent']:.4f}/{ev['candidate']:.4f} | {r['gpu_peak_gib']} | -")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="sloth-tiny on CPU, two gloo processes (plumbing)")
    p.add_argument("--model", default=None, help="model folder (default: build one, as bench_loop does)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quantize", choices=["nf4", "none"], default="nf4", help="the base on both sides")
    p.add_argument("--timeout", type=float, default=240, help="seconds per run")
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model, build = Path(args.model), {"model": args.model}
    else:
        model, build = build_tiny(work / "models") if args.tiny else build_big(work / "models", args.layers)
        build.pop("build", None)
    device = "cpu" if args.tiny else "cuda"
    sides = [("single", Launch(1, {} if args.tiny else {"CUDA_VISIBLE_DEVICES": "0"})),
             ("fsdp", Launch(2, {} if args.tiny else {"CUDA_VISIBLE_DEVICES": "0,1"}))]
    rows = []
    for name, launch in sides:
        job = make_job(model, work / f"adapter-{name}", args.steps, args.batch, device, args.quantize)
        rows.append(run_one(name, job, launch, work / f"run-{name}", args.timeout))
        print(f"{name}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'losses'})}", flush=True)
    ok = [r for r in rows if "error" not in r]
    diff = (max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(ok[0]["losses"], ok[1]["losses"]))
            if len(ok) == 2 and ok[0]["losses"] else None)
    print("\n" + table(rows) + f"\n\nmax relative loss difference: {diff}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "tiny": args.tiny, "model": build,
                                              "quantize": args.quantize,
                                              "max_rel_loss_diff": diff, "rows": rows}, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if len(ok) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
