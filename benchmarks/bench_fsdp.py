"""One update on one device against the same update across two (torchrun + FSDP2, `sloth_daemon.trainer.fsdp`):
losses side by side, time, throughput and peak memory per GPU. GPU by default (two GPUs); `--tiny` runs sloth-tiny
on CPU in two gloo processes (plumbing; relative figures only).

    python -m benchmarks.bench_fsdp [--tiny] [--model DIR] [--layers 32] [--steps 8] [--batch 8]
                                    [--phases load,train] [--device cuda|cpu] [--out benchmarks/results/fsdp.json]

The model: `--model DIR` (e.g. the 8B-shaped checkpoint `benchmarks.bench_loop` saved), else built here as
bench_loop builds it (`build_big`: Llama-3.1-8B shape, random weights, bf16) or sloth-tiny with `--tiny`.
The job is the daemon's (`TrainJob` through `TrainerProcess`, as the updater runs it): `--steps` batches of `--batch`
taught question/answer pairs (bench_loop's `facts`), packed, one eval set of 8 of them, the base quantised as
`--quantize` says (default nf4: the QLoRA-FSDP recipe, README "When one GPU is not enough") on both sides, kernels
off on both sides (off under FSDP). Runs: `single` (one process, CUDA_VISIBLE_DEVICES=0) and `fsdp` (two processes,
CUDA_VISIBLE_DEVICES=0,1). Peak memory: nvidia-smi's used memory of each GPU sampled every 0.2 s during each run
(GiB). A table and JSON (`--out`); `max_rel_loss_diff` is the largest relative difference of a step's loss.

Phase `load` (first; issue 16: the two-process update once spent minutes quantising the base on the host) loads the
NF4 base the way each side does, in fresh processes, and nothing else: `one process` (`recipe.load_base` on
`--device`: the one-process trainer, quantising on its GPU on CUDA), `2 processes, before` (torchrun, each worker
`load_base(load_on="cpu")` with torchrun's one thread: the previous code) and `2 processes, after` (torchrun, each
worker `trainer.fsdp.load_on_host` with `distributed.worker_threads` threads: each weight quantised on its GPU, or
on cpu split between the workers); `--load-rows` picks them. Per row: the slowest process's load seconds (from the
start of loading to the base in host memory, imports included, process start-up not), its ratio to `one process`,
the threads per process, peak host memory of a process (ru_maxrss, GiB), and whether the 4-bit weights (sum of the
bytes) and their quantisation state (sha256) are those of `one process` ("yes/yes"). On cpu the state depends on the
thread count (bitsandbytes' double quantisation subtracts the mean absmax, summed in a thread-dependent order: one
ulp), so rows with other thread counts than `one process` show "yes/no". `--device cpu` runs it on the CPU (gloo;
ratios only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
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
            "gpu_peak_gib": gpus.peaks_gib(),
            "logs": [e["message"] for e in events if e.get("event") == "log"][:10]}  # where the NF4 base was quantised


LOAD_SIDES = {  # --load-rows key: (row name, processes, OMP_NUM_THREADS per process or None for the default)
    "single": ("one process", 1, None),
    "before": ("2 processes, before", 2, "1"),
    "after": ("2 processes, after", 2, None),
}


def nf4_checksum(model) -> list:
    """[sum of the packed 4-bit bytes, sha256 of every quantisation state's tensors] over the NF4 weights: equal
    only when the weights were quantised alike (bytes and state)."""
    import hashlib

    import torch
    from bitsandbytes.nn import Linear4bit

    packed, states = 0, hashlib.sha256()
    for m in model.modules():
        if isinstance(m, Linear4bit):
            packed += int(m.weight.data.view(torch.uint8).sum(dtype=torch.int64))
            qs = m.weight.quant_state
            for t in (qs.absmax, qs.offset, qs.state2.absmax) if qs.nested else (qs.absmax,):
                states.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return [packed, states.hexdigest()[:16]]


def load_worker(mode: str, model: str, device: str, out: str) -> int:
    """One process of a `load` row (run by torchrun, or alone for `single`): load, then write its figures to
    `out`.RANK.json."""
    import os
    import resource

    import torch

    from sloth_daemon.trainer.recipe import load_base

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    job = TrainJob(base_model=model, output_dir=str(Path(out).parent), batches=[], quantize="nf4", device=device)
    here = torch.device(device)
    if here.type == "cuda":
        here = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(here)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        dist.barrier()  # both processes start loading together
    started = time.monotonic()
    if mode == "single":
        base, _ = load_base(job.model_copy(update={"device": str(here)}))
    elif mode == "before":
        base, _ = load_base(job.model_copy(update={"device": str(here)}), load_on="cpu")
    else:
        from sloth_daemon.trainer.fsdp import load_on_host

        base, _ = load_on_host(job.model_copy(update={"device": str(here)}), here, rank, world, lambda e: None)
    seconds = time.monotonic() - started
    row = {"rank": rank, "load_s": round(seconds, 3), "threads": torch.get_num_threads(),
           "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "checksum": nf4_checksum(base) if rank == 0 else None}
    Path(f"{out}.{rank}.json").write_text(json.dumps(row))
    if world > 1:
        dist.destroy_process_group()
    return 0


def run_load(mode: str, model: Path, device: str, work: Path, timeout: float) -> dict:
    """One `load` row in fresh processes (see the module docstring)."""
    import os

    from sloth_daemon.trainer.distributed import worker_threads

    name, processes, threads = LOAD_SIDES[mode]
    out = work / f"load-{mode}"
    worker = ["-m", "benchmarks.bench_fsdp", "--load-worker", mode, str(model), device, str(out)]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    elif processes > 1:
        env["OMP_NUM_THREADS"] = str(worker_threads(processes))  # as trainer.distributed sets it
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *worker]
    if device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = "0" if processes == 1 else "0,1"
    started = time.monotonic()
    # A row cut at its limit must take torchrun's workers with it (they would load on beside the next row, and hold
    # its output open): SIGTERM makes torchrun stop them; then everything left in the session is killed.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(15)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        return {"run": name, "processes": processes, "error": f"killed at its {timeout:.0f} s limit"}
    done = subprocess.CompletedProcess(cmd, proc.returncode, log, "")
    parts = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(processes)
             if Path(f"{out}.{r}.json").exists()]
    if done.returncode != 0 or len(parts) != processes:
        return {"run": name, "processes": processes, "error": f"exit {done.returncode}",
                "log_tail": (done.stdout + done.stderr)[-3000:]}
    return {"run": name, "processes": processes, "wall_s": round(time.monotonic() - started, 2),
            "load_s": max(p["load_s"] for p in parts), "threads": parts[0]["threads"],
            "max_rss_gib": max(p["max_rss_gib"] for p in parts), "checksum": parts[0]["checksum"], "ranks": parts}


def load_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["run"] == "one process" and "error" not in r), None)
    lines = ["run | processes | threads each | load s (slowest) | x one process | peak host GiB | same 4-bit bytes/"
             "state as one process | error", "--- | --- | --- | --- | --- | --- | --- | ---"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['run']} | {r['processes']} | - | - | - | - | - | {r['error']}")
            continue
        ratio = round(r["load_s"] / base["load_s"], 2) if base else None
        same = [a == b for a, b in zip(r["checksum"], base["checksum"])] if base else None
        r["x_one_process"], r["same_nf4_as_one_process"] = ratio, same
        shown = "/".join("yes" if x else "no" for x in same) if same else "-"
        lines.append(f"{r['run']} | {r['processes']} | {r['threads']} | {r['load_s']} | {ratio} | "
                     f"{r['max_rss_gib']} | {shown} | -")
    return "\n".join(lines)


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
    p.add_argument("--phases", default="load,train", help="load (host loading only), train (the updates), or both")
    p.add_argument("--device", default=None, help="default: cuda, cpu with --tiny")
    p.add_argument("--load-rows", default="single,before,after",
                   help="load rows: single (one process), before (the previous two-process load), after")
    p.add_argument("--load-timeout", type=float, default=None, help="seconds per load row (default: --timeout)")
    p.add_argument("--load-worker", nargs=4, default=None, help=argparse.SUPPRESS)  # one process of a load row
    args = p.parse_args(argv)
    if args.load_worker:
        return load_worker(*args.load_worker)
    phases = set(args.phases.split(","))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model, build = Path(args.model), {"model": args.model}
    else:
        model, build = build_tiny(work / "models") if args.tiny else build_big(work / "models", args.layers)
        build.pop("build", None)
    device = args.device or ("cpu" if args.tiny else "cuda")
    load_rows: list[dict] = []
    rows: list[dict] = []
    diff = None

    def save() -> None:  # after every row: a run cut by an outer limit still leaves what it measured
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "tiny": args.tiny, "model": build,
                                                  "device": device, "quantize": args.quantize,
                                                  "max_rel_loss_diff": diff, "load_rows": load_rows, "rows": rows},
                                                 indent=2) + "\n")

    if "load" in phases:
        for mode in args.load_rows.split(","):
            load_rows.append(run_load(mode, model, device, work, args.load_timeout or args.timeout))
            shown = {k: v for k, v in load_rows[-1].items() if k != "ranks"}
            print(f"load {shown['run']}: {json.dumps(shown)}", flush=True)
            save()
        print("\n" + load_table(load_rows) + "\n", flush=True)
        save()
    sides = [("single", Launch(1, {} if args.tiny else {"CUDA_VISIBLE_DEVICES": "0"})),
             ("fsdp", Launch(2, {} if args.tiny else {"CUDA_VISIBLE_DEVICES": "0,1"}))]
    for name, launch in (sides if "train" in phases else []):
        job = make_job(model, work / f"adapter-{name}", args.steps, args.batch, device, args.quantize)
        rows.append(run_one(name, job, launch, work / f"run-{name}", args.timeout))
        print(f"{name}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'losses'})}", flush=True)
        save()
    ok = [r for r in rows if "error" not in r]
    diff = (max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(ok[0]["losses"], ok[1]["losses"]))
            if len(ok) == 2 and ok[0]["losses"] else None)
    if rows:
        print("\n" + table(rows) + f"\n\nmax relative loss difference: {diff}")
    save()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    loaded = all("error" not in r for r in load_rows)
    return 0 if loaded and ("train" not in phases or len(ok) == 2) else 1


if __name__ == "__main__":
    sys.exit(main())
